"""TRL's DPOTrainer with a PEFT LoRA config trains the FAM model on preference pairs: the loss it optimises is the
DPO loss of the FAM model's own log-probabilities, each completion read one sequence at a time without padding
(the policy with the adapter, the reference with it disabled), and `fam_init` trains.

DPO batches chosen and rejected completions of different lengths with right padding and reads per-token
log-probabilities through `model(..., fused_lm_head=True).log_probs` (issue 15's route): a path that skipped FAM,
or a padding mask lost on the way, would change them.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
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


def _pairs():
    """Prompts of several FAM blocks (C = 8), completions of different lengths, so that rows are padded."""
    rows = {"prompt": [], "chosen": [], "rejected": []}
    for i, text in enumerate(TEXTS[:4]):
        rows["prompt"].append(f"{text} {TEXTS[(i + 1) % len(TEXTS)]}:")
        rows["chosen"].append(f" {TEXTS[(i + 2) % len(TEXTS)]}")
        rows["rejected"].append(f" {TEXTS[(i + 3) % len(TEXTS)][: 12 + 5 * i]}")
    return Dataset.from_dict(rows)


def _dpo_loss(policy, batch):
    """DPO's loss from the FAM model's log-probabilities (the reference: the adapter disabled)."""
    rows = batch["input_ids"], batch["attention_mask"], batch["completion_mask"]
    chosen, rejected = completion_logps(policy, *rows).chunk(2)
    with policy.disable_adapter():
        ref_chosen, ref_rejected = completion_logps(policy, *rows).chunk(2)
    return -F.logsigmoid(BETA * ((chosen - ref_chosen) - (rejected - ref_rejected))).mean()


RecordingDPOTrainer = recording_trainer(trl.DPOTrainer, _dpo_loss)


@pytest.fixture(scope="module")
def fam_folder(tmp_path_factory):
    return fam_checkpoint(tmp_path_factory.mktemp("dpo") / "fam")


@pytest.mark.parametrize("precompute", [False, True], ids=["reference-per-step", "reference-precomputed"])
def test_dpo_trainer_optimises_the_dpo_loss_of_the_fam_model(fam_folder, tmp_path, precompute):
    """`precompute_ref_log_probs`: the reference's log-probabilities are read once, before training, through
    another call (`compute_ref_log_probs`)."""
    model = AutoModelForCausalLM.from_pretrained(fam_folder, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(fam_folder)
    fam_init = model.fam.fam_init.detach().clone()
    config = trl.DPOConfig(output_dir=str(tmp_path / "out"), max_steps=3, per_device_train_batch_size=2, beta=BETA,
                           learning_rate=5e-2, lr_scheduler_type="constant", logging_steps=1, save_strategy="no",
                           report_to=[], use_cpu=True, max_length=256, bf16=False, seed=0, data_seed=0,
                           dataloader_num_workers=0, disable_tqdm=True, precompute_ref_log_probs=precompute)
    lora = client_lora()
    trainer = RecordingDPOTrainer(model=model, args=config, train_dataset=_pairs(), processing_class=tokenizer,
                                  peft_config=lora)
    trainer.records = []
    trainer.train()

    assert len(trainer.records) == 3
    padded = [r for r in trainer.records if not bool(r["batch"]["attention_mask"].all())]
    assert padded, "no batch had padding: the test would not see a lost padding mask"
    for record in trainer.records:
        assert abs(record["trained"] - record["direct"]) <= 1e-5, record
    # from step 2 on the adapter differs from the reference: the loss is no longer log 2
    assert abs(trainer.records[-1]["trained"] - 0.6931472) > 1e-3
    assert_trained_on_fam(trainer, fam_init, fam_folder)
