"""`enable_loss_chunk`: `fam_loss_chunk` reaches training loops that build the forward's arguments themselves.

Under transformers' `Trainer` the optimised loss is the FAM model's loss on the batch (<= 1e-5) and the head only
ever sees K tokens at a time in training; evaluation keeps full logits; a call's own `fam_loss_chunk` and TRL's
`fused_lm_head` calls are left alone; a model that is not FAM, where the keyword would be ignored, is refused.
"""

from __future__ import annotations

import pytest
import torch
from client_helpers import TEXTS, fam_checkpoint, normalised
from conftest import random_ids
from datasets import Dataset
from peft import get_peft_model
from test_families import build
from transformers import AutoModelForCausalLM, AutoTokenizer, Trainer, TrainingArguments

import hf_fam
from hf_fam.modeling.fam_compat import checkpointing_training_args
from hf_fam.training import FAMDataCollator, enable_loss_chunk, fam_lora_config, save_training_base, unwrap_fam_model

K = 16


def head_lengths(model) -> tuple[list[int], object]:
    """Record the token count of every call of the model's LM head."""
    seen: list[int] = []
    head = unwrap_fam_model(model).get_output_embeddings()
    return seen, head.register_forward_hook(lambda m, args, out: seen.append(args[0].shape[1]))


class RecordingTrainer(Trainer):
    """Records each step's optimised loss and, without the hook, the FAM model's full-logits loss on the batch."""

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        batch = {k: v.clone() for k, v in inputs.items()}
        loss = super().compute_loss(model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch)
        self.handle.remove()
        with torch.no_grad():
            direct = model(**batch, use_cache=False, **normalised(num_items_in_batch)).loss
        self.handle = enable_loss_chunk(model, K)
        self.records.append((loss.item(), direct.item()))
        return loss


def test_trainer_trains_with_the_chunked_loss(tmp_path):
    folder = fam_checkpoint(tmp_path / "fam", route="converted")
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    save_training_base(model, tmp_path / "train-base", tokenizer)  # out of the zero-shot start
    peft_model = get_peft_model(model, fam_lora_config(model, r=4, lora_dropout=0.0))
    rows = [tokenizer(" ".join([t] * 2)).input_ids for t in TEXTS]  # 70-150 tokens: several chunks of K
    args = TrainingArguments(output_dir=str(tmp_path / "out"), max_steps=2, per_device_train_batch_size=2,
                             learning_rate=5e-2, lr_scheduler_type="constant", logging_steps=1, save_strategy="no",
                             report_to=[], use_cpu=True, seed=0, disable_tqdm=True, remove_unused_columns=False,
                             **checkpointing_training_args())
    trainer = RecordingTrainer(model=peft_model, args=args, train_dataset=Dataset.from_dict({"input_ids": rows}),
                               data_collator=FAMDataCollator(pad_token_id=tokenizer.pad_token_id))
    trainer.records, trainer.handle = [], enable_loss_chunk(peft_model, K)
    seen, hook = head_lengths(peft_model)
    trainer.train()
    hook.remove()

    assert len(trainer.records) == 2
    for trained, direct in trainer.records:
        assert abs(trained - direct) <= 1e-5, (trained, direct)
    # training: no logits kept (0), then K-token chunks; the recording's own forwards, without the hook, see
    # whole rows (> K)
    assert 0 in seen and K in seen and max(seen) > K


def test_training_forwards_with_labels_only():
    model = hf_fam.FAMForCausalLM.from_base_model(build("llama-tied"), block_size=8, memory_segments=1,
                                                  fam_length=4)
    ids = random_ids(1, 40, seed=1)
    handle = enable_loss_chunk(model, K)
    seen, hook = head_lengths(model)
    model.train()
    chunked = model(input_ids=ids, labels=ids).loss
    assert seen == [0, K, K, 40 - 2 * K] and model(input_ids=ids).logits.shape[1] == 40  # no labels: untouched
    seen.clear()
    model(input_ids=ids, labels=ids, fam_loss_chunk=10)  # the call's own value wins
    assert seen == [0, 10, 10, 10, 10]
    model.eval()
    assert model(input_ids=ids, labels=ids).logits.shape[1] == 40  # evaluation keeps the logits metrics read
    handle.remove()
    model.train()
    seen.clear()
    assert abs(model(input_ids=ids, labels=ids).loss.item() - chunked.item()) <= 1e-5 and seen == [40]
    hook.remove()


def test_refuses_a_model_that_is_not_fam():
    with pytest.raises(ValueError, match="expected a FAM model"):
        enable_loss_chunk(build("llama-tied"))
    model = hf_fam.FAMForCausalLM.from_base_model(build("llama-tied"), block_size=8, memory_segments=1,
                                                  fam_length=4)
    for bad in (0, -3, 1.5, True):
        with pytest.raises(ValueError, match="positive number of tokens"):
            enable_loss_chunk(model, bad)
