"""TRL's DistillationTrainer (on-policy distillation) with a FAM student and a PEFT LoRA config: the completions
come from FAM's `generate` (prompts left-padded), and the divergence it trains on is computed from hidden states it
reads from the student's backbone (`model.base_model`, not the model's forward) and projects with the student's
`lm_head` itself. Those hidden states must be FAM's: projected, they are the FAM model's logits with the adapter
and its trained `fam_init`, each row read alone without padding; the teacher (a plain model) keeps its own.
"""

from __future__ import annotations

import pytest
import torch
from client_helpers import TEXTS, base_folder, client_lora, fam_checkpoint
from datasets import Dataset
from transformers import AutoModelForCausalLM, AutoTokenizer

trl = pytest.importorskip("trl")
if not hasattr(trl, "DistillationTrainer"):
    pytest.skip("this TRL has no DistillationTrainer", allow_module_level=True)

from hf_fam.training import unwrap_fam_model  # noqa: E402


def _prompts():
    """Prompts of different lengths, several FAM blocks (C = 8) each: left padding in every batch."""
    return Dataset.from_dict({"prompt": [" ".join(TEXTS[i:i + 1 + i % 3]) for i in range(4)]})


class RecordingDistillationTrainer(trl.DistillationTrainer):
    """Records, for every backbone read, whose it was, its rows, and the logits its hidden states give next to
    those of each row read alone by that model's full forward."""

    def _get_last_hidden_state(self, unwrapped_model, input_ids, attention_mask, logits_to_keep, **kwargs):
        hidden = super()._get_last_hidden_state(unwrapped_model, input_ids, attention_mask, logits_to_keep, **kwargs)
        was_training = unwrapped_model.training
        unwrapped_model.eval()  # no dropout: the trainer disables it in the student (disable_dropout)
        try:
            with torch.no_grad():
                logits = unwrapped_model.get_output_embeddings()(hidden).float()
                direct = _direct_logits(unwrapped_model, input_ids, attention_mask, logits_to_keep)
        finally:
            unwrapped_model.train(was_training)
        self.records.append(dict(student=unwrapped_model is self.accelerator.unwrap_model(self.model),
                                 mask=attention_mask.clone(), logits=logits, direct=direct))
        return hidden


def _direct_logits(model, ids, mask, keep):
    """(rows, keep, vocab) logits predicting the last `keep` positions' tokens, each row read alone by the model's
    forward: its real tokens only (left padding before the prompt, right padding after the completion cut off); NaN
    where the token is padding."""
    out = torch.full((ids.shape[0], keep, model.config.vocab_size), float("nan"))
    for row in range(ids.shape[0]):
        real = mask[row].bool()
        logits = model(input_ids=ids[row][real][None], use_cache=False).logits[0].float()
        index = torch.cumsum(real.long(), 0) - 1  # position -> index among the real tokens
        for j, position in enumerate(range(ids.shape[1] - keep, ids.shape[1])):
            if real[position] and index[position] > 0:
                out[row, j] = logits[index[position] - 1]
    return out


@pytest.fixture(scope="module")
def fam_folder(tmp_path_factory):
    return fam_checkpoint(tmp_path_factory.mktemp("distillation") / "fam")


def test_distillation_reads_the_fam_student_s_hidden_states(fam_folder, tmp_path):
    student = AutoModelForCausalLM.from_pretrained(fam_folder, dtype=torch.float32)
    teacher = AutoModelForCausalLM.from_pretrained(base_folder(fam_folder), dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(fam_folder)
    fam_init = student.fam.fam_init.detach().clone()
    config = trl.DistillationConfig(output_dir=str(tmp_path / "out"), max_steps=2, per_device_train_batch_size=4,
                                    max_completion_length=6, learning_rate=5e-2, lr_scheduler_type="constant",
                                    logging_steps=1, save_strategy="no", report_to=[], use_cpu=True, bf16=False,
                                    seed=0, data_seed=0, dataloader_num_workers=0, disable_tqdm=True,
                                    disable_dropout=True)
    lora = client_lora()
    trainer = RecordingDistillationTrainer(model=student, teacher_model=teacher, args=config,
                                           train_dataset=_prompts(), processing_class=tokenizer, peft_config=lora)
    trainer.records = []
    trainer.train()

    students = [r for r in trainer.records if r["student"]]
    assert len(students) == 2 and len(trainer.records) == 4, [r["student"] for r in trainer.records]
    left_padded = right_padded = False
    for record in trainer.records:
        mask, direct = record["mask"], record["direct"]
        left_padded |= bool((mask[:, 0] == 0).any())
        right_padded |= bool((mask[:, -1] == 0).any())
        scored = ~direct[..., 0].isnan()
        assert scored.sum() > 0
        diff = (record["logits"][scored] - direct[scored]).abs().max().item()
        assert diff <= 1e-5, (record["student"], diff)
    assert left_padded, "no left padding: the test would not see a lost padding mask"
    trained_init = unwrap_fam_model(trainer.model).fam.modules_to_save["default"].fam_init
    assert (trained_init.detach() - fam_init).abs().max() > 1e-4  # the memory trained, through the backbone route

    # the student's logits are FAM's, not the plain model's: the teacher (the plain model) read the same rows next
    last = max(i for i, r in enumerate(trainer.records) if r["student"])
    student, teacher_read = trainer.records[last], trainer.records[last + 1]
    assert not teacher_read["student"] and torch.equal(teacher_read["mask"], student["mask"])
    scored = ~student["direct"][..., 0].isnan()
    assert (teacher_read["direct"][scored] - student["direct"][scored]).abs().max() > 1e-2
