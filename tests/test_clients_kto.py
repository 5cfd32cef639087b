"""TRL's KTOTrainer with a PEFT LoRA config trains the FAM model on unpaired feedback (a completion labelled
desirable or not): the loss it optimises is the KTO loss of the FAM model's own log-probabilities, each sequence
read alone without padding (the policy with the adapter, the reference with it disabled), its KL estimate
included, and `fam_init` trains.

KTO batches completions of different lengths with right padding, reads a second, mismatched batch for the KL
estimate (each prompt with another row's completion) and reads per-token log-probabilities through
`model(..., fused_lm_head=True).log_probs`: a path that skipped FAM, or a padding mask lost on the way, would change
them.
"""

from __future__ import annotations

import pytest
import torch
from client_helpers import (
    TEXTS,
    assert_trained_on_fam,
    client_lora,
    completion_logps,
    fam_checkpoint,
    recording_trainer,
)
from datasets import Dataset
from transformers import AutoModelForCausalLM, AutoTokenizer

trl = pytest.importorskip("trl")


BETA = 0.5
BATCH = 4


def _feedback():
    """Prompts of several FAM blocks (C = 8), completions of different lengths (so that rows are padded), half of
    them desirable; in each batch of four both labels occur."""
    rows = {"prompt": [], "completion": [], "label": []}
    for i, text in enumerate(TEXTS):
        rows["prompt"].append(f"{text} {TEXTS[(i + 1) % len(TEXTS)]}:")
        rows["completion"].append(f" {TEXTS[(i + 2) % len(TEXTS)][: 10 + 6 * i]}")
        rows["label"].append(i % 2 == 0)
    return Dataset.from_dict(rows)


def _kto_loss(policy, batch):
    """KTO's loss (arXiv 2402.01306, Eq. 7, TRL's weights 1): desirable rows 1 - σ(β(r - z)), undesirable
    1 - σ(β(z - r)), r the log-ratio of policy to reference, z the KL estimate on the mismatched batch (≥ 0)."""
    def logps(model):
        matched = completion_logps(model, batch["input_ids"], batch["attention_mask"], batch["completion_mask"])
        mismatched = completion_logps(model, batch["KL_input_ids"], batch["KL_attention_mask"],
                                     batch["KL_completion_mask"])
        return matched, mismatched

    policy_logps, policy_kl = logps(policy)
    with policy.disable_adapter():
        reference_logps, reference_kl = logps(policy)
    kl = (policy_kl - reference_kl).mean().clamp(min=0)
    ratio = policy_logps - reference_logps
    desirable = batch["label"].bool()
    losses = torch.where(desirable, 1 - torch.sigmoid(BETA * (ratio - kl)), 1 - torch.sigmoid(BETA * (kl - ratio)))
    return losses.mean()


RecordingKTOTrainer = recording_trainer(trl.KTOTrainer, _kto_loss)


@pytest.fixture(scope="module")
def fam_folder(tmp_path_factory):
    return fam_checkpoint(tmp_path_factory.mktemp("kto") / "fam")


def test_kto_trainer_optimises_the_kto_loss_of_the_fam_model(fam_folder, tmp_path):
    model = AutoModelForCausalLM.from_pretrained(fam_folder, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(fam_folder)
    fam_init = model.fam.fam_init.detach().clone()
    config = trl.KTOConfig(output_dir=str(tmp_path / "out"), max_steps=2, per_device_train_batch_size=BATCH,
                           beta=BETA, learning_rate=5e-2, lr_scheduler_type="constant", logging_steps=1,
                           save_strategy="no", report_to=[], use_cpu=True, max_length=256, bf16=False, seed=0,
                           data_seed=0, dataloader_num_workers=0, disable_tqdm=True)
    lora = client_lora()
    trainer = RecordingKTOTrainer(model=model, args=config, train_dataset=_feedback(), processing_class=tokenizer,
                                  peft_config=lora)
    trainer.records = []
    trainer.train()

    assert len(trainer.records) == 2
    for record in trainer.records:
        batch = record["batch"]
        assert "KL_input_ids" in batch, "no KL batch: the test would not check the KL estimate"
        assert not bool(batch["attention_mask"].all()), "no padding: the test would not see a lost padding mask"
        assert 0 < int(batch["label"].sum()) < BATCH  # both kinds of feedback in the batch
        assert abs(record["trained"] - record["direct"]) <= 1e-5, record
    # at step 1 the adapter is the reference (loss 1 - σ(0) = 0.5); at step 2 it is no longer
    assert abs(trainer.records[0]["trained"] - 0.5) <= 1e-6
    assert abs(trainer.records[-1]["trained"] - 0.5) > 1e-3
    assert_trained_on_fam(trainer, fam_init, fam_folder)
