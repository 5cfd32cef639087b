"""transformers' `Trainer` with the project's data collator (`FAMDataCollator`, right padding, labels -100 on
padding) trains a FAM checkpoint loaded by path, with LoRA (`fam_lora_config`: `fam_init` through
`modules_to_save`) and gradient checkpointing: the loss it optimises is the FAM model's loss on the same batch, and
`fam_init` moves."""

from __future__ import annotations

import torch
from client_helpers import TEXTS, base_folder, fam_checkpoint, normalised
from datasets import Dataset
from peft import get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer, Trainer, TrainingArguments

from hf_fam.modeling.fam_compat import checkpointing_training_args
from hf_fam.training import FAMDataCollator, fam_lora_config, save_training_base, unwrap_fam_model


def _checkpointing(model) -> bool:
    """Whether the decoder layers run with gradient checkpointing (transformers sets the flag on each layer)."""
    return any(getattr(m, "gradient_checkpointing", False) is True for m in model.modules())


class RecordingTrainer(Trainer):
    """Records each step's optimised loss and the FAM model's own loss on that batch."""

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        batch = {k: v.clone() for k, v in inputs.items()}
        loss = super().compute_loss(model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch)
        with torch.no_grad():
            direct = model(**batch, use_cache=False, **normalised(num_items_in_batch)).loss
        self.records.append(dict(batch=batch, trained=(loss[0] if isinstance(loss, tuple) else loss).item(),
                                 direct=direct.item(),
                                 checkpointing=_checkpointing(unwrap_fam_model(model))))
        return loss


def test_trainer_with_the_fam_collator_optimises_the_fam_loss(tmp_path):
    folder = fam_checkpoint(tmp_path / "fam", route="converted")
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    save_training_base(model, tmp_path / "train-base", tokenizer)  # a converted checkpoint is in its zero-shot start
    fam_init = model.fam.fam_init.detach().clone()
    peft_model = get_peft_model(model, fam_lora_config(model, r=4, lora_dropout=0.0))
    rows = [tokenizer(t).input_ids for t in TEXTS]  # 35-77 tokens (bytes), unequal: the collator pads
    dataset = Dataset.from_dict({"input_ids": rows})
    args = TrainingArguments(output_dir=str(tmp_path / "out"), max_steps=2, per_device_train_batch_size=2,
                             learning_rate=5e-2, lr_scheduler_type="constant", logging_steps=1, save_strategy="no",
                             report_to=[], use_cpu=True, **checkpointing_training_args(),
                             seed=0, disable_tqdm=True,
                             remove_unused_columns=False)
    trainer = RecordingTrainer(model=peft_model, args=args, train_dataset=dataset,
                               data_collator=FAMDataCollator(pad_token_id=tokenizer.pad_token_id))
    trainer.records = []
    trainer.train()

    assert len(trainer.records) == 2
    for step, r in enumerate(trainer.records):
        assert r["checkpointing"]
        assert (r["batch"]["attention_mask"] == 0).any(), "the batch is not padded"
        assert abs(r["trained"] - r["direct"]) <= 1e-5, (step, r["trained"], r["direct"])
    first = trainer.records[0]["batch"]
    base = AutoModelForCausalLM.from_pretrained(base_folder(folder), dtype=torch.float32).eval()
    with torch.no_grad():
        base_loss = base(**first).loss.item()
    assert abs(base_loss - trainer.records[0]["direct"]) > 1e-4, "the batch does not tell FAM from the base model"
    assert (unwrap_fam_model(trainer.model).fam.fam_init.detach() - fam_init).abs().max().item() > 1e-4
