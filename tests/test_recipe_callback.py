"""`FAMRecipeCallback`: the HF `Trainer` interrupted after a checkpoint and resumed from it ends with the weights of
the uninterrupted run, Random State Passing and Random Position Offset on; without the callback it does not."""

from __future__ import annotations

import shutil

import pytest
import torch
from client_helpers import TEXTS, fam_checkpoint
from datasets import Dataset
from peft import get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer, Trainer, TrainingArguments

from hf_fam.training import (
    FAMDataCollator,
    FAMRecipeCallback,
    FAMRecipeConfig,
    attach_recipe,
    fam_lora_config,
    save_training_base,
)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """A converted checkpoint saved as the base adapters train on (the paper's update, content slots)."""
    root = tmp_path_factory.mktemp("recipe_callback")
    converted = fam_checkpoint(root / "fam", route="converted")
    model = AutoModelForCausalLM.from_pretrained(converted, dtype=torch.float32)
    return save_training_base(model, root / "train-base", AutoTokenizer.from_pretrained(converted))


def _train(folder, out, *, max_steps, resume=None, callback=True):
    """A LoRA Trainer run with the recipe attached; returns the trained weights."""
    tokenizer = AutoTokenizer.from_pretrained(folder)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    peft_model = get_peft_model(model, fam_lora_config(model, r=4, lora_dropout=0.1))
    recipe = attach_recipe(peft_model, FAMRecipeConfig(state_passing_prob=0.8, position_offset_prob=0.5, seed=0))
    dataset = Dataset.from_dict({"input_ids": [tokenizer(t).input_ids for t in TEXTS]})
    args = TrainingArguments(output_dir=str(out), max_steps=max_steps, per_device_train_batch_size=2,
                             learning_rate=5e-2, lr_scheduler_type="linear", logging_steps=1, save_strategy="steps",
                             save_steps=2, report_to=[], use_cpu=True, seed=0, disable_tqdm=True,
                             remove_unused_columns=False)
    trainer = Trainer(model=peft_model, args=args, train_dataset=dataset,
                      data_collator=FAMDataCollator(pad_token_id=tokenizer.pad_token_id),
                      callbacks=[FAMRecipeCallback(recipe)] if callback else [])
    trainer.train(resume_from_checkpoint=resume)
    recipe.remove()
    return {n: p.detach().clone() for n, p in peft_model.named_parameters() if p.requires_grad}


def _equal(a, b) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[n], b[n]) for n in a)


def test_a_trainer_run_resumed_from_a_checkpoint_ends_as_the_uninterrupted_run(folder, tmp_path):
    whole = _train(folder, tmp_path / "whole", max_steps=6)
    assert (tmp_path / "whole" / "checkpoint-2" / "fam_recipe_state_0.pt").is_file()
    # the run "interrupted" after its step-2 checkpoint: resumed from that checkpoint, in a copy of it
    shutil.copytree(tmp_path / "whole" / "checkpoint-2", tmp_path / "run" / "checkpoint-2")
    resumed = _train(folder, tmp_path / "run", max_steps=6, resume=str(tmp_path / "run" / "checkpoint-2"))
    assert _equal(resumed, whole)

    # without the callback the recipe starts over at step 3: another run
    shutil.copytree(tmp_path / "whole" / "checkpoint-2", tmp_path / "plain" / "checkpoint-2")
    (tmp_path / "plain" / "checkpoint-2" / "fam_recipe_state_0.pt").unlink()
    other = _train(folder, tmp_path / "plain", max_steps=6, resume=str(tmp_path / "plain" / "checkpoint-2"),
                   callback=False)
    assert not _equal(other, whole)
