"""TRL's GRPOTrainer and RLOOTrainer (the same two uses, another advantage) with a PEFT LoRA config run the FAM
model both ways they use a model: `generate` for the
completions (prompts left-padded, FAM's streaming cache) and `model(..., fused_lm_head=True).log_probs` for the
completions' per-token log-probabilities (rows with left padding before the prompt and right padding after the
completion). Those log-probabilities are the FAM model's, each row read alone without padding; transformers'
continuous batching (`use_transformers_continuous_batching`), which has no FAM cache, is refused in one line.
"""

from __future__ import annotations

import pytest
import torch
from client_helpers import TEXTS, client_lora, fam_checkpoint
from datasets import Dataset
from transformers import AutoModelForCausalLM, AutoTokenizer

trl = pytest.importorskip("trl")


def _prompts():
    """Prompts of different lengths, several FAM blocks (C = 8) each: left padding in every batch."""
    return Dataset.from_dict({"prompt": [" ".join(TEXTS[i:i + 1 + i % 3]) for i in range(4)]})


def _reward(completions, **kwargs):
    return [float(len(set(c))) for c in completions]  # any score that varies: advantages are not all zero


TRAINERS = {"grpo": (trl.GRPOTrainer, trl.GRPOConfig), "rloo": (trl.RLOOTrainer, trl.RLOOConfig)}


def _config(kind, out, **overrides):
    kwargs = dict(output_dir=str(out), max_steps=2, per_device_train_batch_size=4, num_generations=2,
                  max_completion_length=6, learning_rate=5e-2, lr_scheduler_type="constant", logging_steps=1,
                  save_strategy="no", report_to=[], use_cpu=True, bf16=False, seed=0, data_seed=0,
                  dataloader_num_workers=0, disable_tqdm=True)
    kwargs.update(overrides)
    return TRAINERS[kind][1](**kwargs)


class Recording:
    """Records every call that scores completions: the padded rows, the log-probabilities the trainer got, and those
    of each row read alone by the model as it is at that moment."""

    def _get_per_token_logps_and_entropies(self, model, input_ids, attention_mask, logits_to_keep, *args, **kwargs):
        result = super()._get_per_token_logps_and_entropies(model, input_ids, attention_mask, logits_to_keep,
                                                            *args, **kwargs)
        peft_model = self.accelerator.unwrap_model(model)
        was_training = peft_model.training
        peft_model.eval()  # no dropout: the trainer's forward ran without (lora_dropout 0)
        try:
            direct = _direct_logps(peft_model, input_ids, attention_mask, logits_to_keep)
        finally:
            peft_model.train(was_training)
        self.records.append(dict(mask=attention_mask.clone(), logps=result[0].detach().float().clone(),
                                 direct=direct))
        return result


def _direct_logps(model, ids, mask, keep):
    """(rows, keep) log-probabilities of the last `keep` positions' tokens, each row read alone: its real tokens
    only (left padding before the prompt, right padding after the completion cut off); NaN at padding."""
    out = torch.full((ids.shape[0], keep), float("nan"))
    for row in range(ids.shape[0]):
        real = mask[row].bool()
        tokens = ids[row][real]
        with torch.no_grad():
            logps = model(input_ids=tokens[None], use_cache=False).logits[0].float().log_softmax(-1)
        index = torch.cumsum(real.long(), 0) - 1  # position -> index among the real tokens
        for j, position in enumerate(range(ids.shape[1] - keep, ids.shape[1])):
            if real[position] and index[position] > 0:
                out[row, j] = logps[index[position] - 1, ids[row, position]]
    return out


@pytest.fixture(scope="module")
def fam_folder(tmp_path_factory):
    return fam_checkpoint(tmp_path_factory.mktemp("grpo") / "fam")


@pytest.mark.parametrize("kind, beta", [("grpo", 0.0), ("grpo", 0.1), ("rloo", 0.1)],
                         ids=["grpo-no-reference", "grpo-kl-to-reference", "rloo-kl-to-reference"])
def test_completions_are_scored_with_the_fam_model_s_log_probabilities(fam_folder, tmp_path, kind, beta):
    """beta > 0 adds a KL term to the reference (the adapter disabled): its log-probabilities are scored too."""
    model = AutoModelForCausalLM.from_pretrained(fam_folder, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(fam_folder)
    recording = type("Recording" + TRAINERS[kind][0].__name__, (Recording, TRAINERS[kind][0]), {})
    trainer = recording(model=model, reward_funcs=_reward, args=_config(kind, tmp_path / "out", beta=beta),
                        train_dataset=_prompts(), processing_class=tokenizer, peft_config=client_lora())
    trainer.records = []
    trainer.train()

    # per step: the policy trained, with beta > 0 the reference, and for RLOO the policy as it generated (its
    # sequence log-probability, in the reward)
    per_step = 1 + (beta > 0) + (kind == "rloo")
    assert len(trainer.records) == 2 * per_step, len(trainer.records)
    left_padded = right_padded = False
    for record in trainer.records:
        mask, direct = record["mask"], record["direct"]
        left_padded |= bool((mask[:, 0] == 0).any())
        right_padded |= bool((mask[:, -1] == 0).any())
        scored = ~direct.isnan()
        assert scored.sum() > 0
        diff = (record["logps"][scored] - direct[scored]).abs().max().item()
        assert diff <= 1e-5, diff
    assert left_padded and right_padded, "no row padded on both sides: the test would not see a lost padding mask"


@pytest.mark.parametrize("kind", TRAINERS)
def test_continuous_batching_is_refused_in_one_line(fam_folder, tmp_path, kind):
    model = AutoModelForCausalLM.from_pretrained(fam_folder, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(fam_folder)
    trainer = TRAINERS[kind][0](model=model, reward_funcs=_reward, processing_class=tokenizer,
                                peft_config=client_lora(), train_dataset=_prompts(),
                                args=_config(kind, tmp_path / "out", use_transformers_continuous_batching=True))
    with pytest.raises(ValueError, match="FAM models do not support continuous batching"):
        trainer.train()
