"""TRL's SFTTrainer with a PEFT LoRA config trains the FAM model: the loss it optimises is the FAM model's loss on
the same batch, `fam_init` trains through `modules_to_save`, gradient checkpointing and bf16 autocast work, and
padding-free / packed batches (several documents in one row) are refused with one clear line.

TRL calls `model(**inputs, fused_lm_head=True)`, which runs `model.base_model(...)` and applies the LM head itself
(issue 15): these tests fail if that route skips FAM.
"""

from __future__ import annotations

import pytest
import torch
from client_helpers import TEXTS, base_folder, fam_checkpoint, normalised
from datasets import Dataset
from peft import LoraConfig
from transformers import AutoModelForCausalLM, AutoTokenizer
from transformers.utils import is_torch_bf16_available_on_device

trl = pytest.importorskip("trl")

from hf_fam.training import unwrap_fam_model  # noqa: E402

PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _lora():
    return LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=PROJECTIONS, modules_to_save=["fam"],
                      task_type="CAUSAL_LM")


def _config(out, **overrides):
    kwargs = dict(output_dir=str(out), max_steps=3, per_device_train_batch_size=2, learning_rate=5e-2,
                  lr_scheduler_type="constant", warmup_steps=0, logging_steps=1, save_strategy="no", report_to=[],
                  use_cpu=True, gradient_checkpointing=True, max_length=64, packing=False, bf16=False,
                  dataset_text_field="text", seed=0, data_seed=0, dataloader_num_workers=0,
                  disable_tqdm=True)
    kwargs.update(overrides)
    return trl.SFTConfig(**kwargs)


def _dataset(repeat=2):
    # each text repeated so that every row is several FAM windows (16 tokens) long
    return Dataset.from_dict({"text": [" ".join([t] * repeat) for t in TEXTS]})


def _checkpointing(model) -> bool:
    """Whether the decoder layers run with gradient checkpointing (transformers sets the flag on each layer)."""
    return any(getattr(m, "gradient_checkpointing", False) is True for m in model.modules())


class RecordingSFTTrainer(trl.SFTTrainer):
    """Records, for every training step, the loss TRL optimises and the FAM model's own loss on that batch
    (`model(input_ids, attention_mask, labels).loss`: FAMForCausalLM.forward, the full-logits route)."""

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        batch = {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in inputs.items()}
        fam = unwrap_fam_model(model)
        dtypes = set()  # what the decoder's MLPs compute in (accelerate puts autocast around the model's forward)
        hook = fam.get_decoder().layers[0].mlp.register_forward_hook(lambda m, i, out: dtypes.add(out.dtype))
        try:
            loss = super().compute_loss(model, inputs, return_outputs=return_outputs,
                                        num_items_in_batch=num_items_in_batch)
        finally:
            hook.remove()
        trained = loss[0] if isinstance(loss, tuple) else loss
        with torch.no_grad():
            direct = model(input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask"),
                           labels=batch["labels"], use_cache=False, **normalised(num_items_in_batch)).loss
        self.records.append(dict(batch=batch, trained=trained.detach().float().item(), direct=direct.float().item(),
                                 checkpointing=_checkpointing(fam),
                                 dtypes=dtypes))
        return loss


def _train(folder, tmp_path, **config):
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    fam_init = model.fam.fam_init.detach().clone()
    trainer = RecordingSFTTrainer(model=model, args=_config(tmp_path / "out", **config), train_dataset=_dataset(),
                                  processing_class=tokenizer, peft_config=_lora())
    trainer.records = []
    trainer.train()
    return trainer, fam_init


def _base_loss(folder, batch):
    """The same batch through the unconverted base model: what a route that skips FAM would optimise."""
    base = AutoModelForCausalLM.from_pretrained(base_folder(folder), dtype=torch.float32).eval()
    with torch.no_grad():
        return base(input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask"),
                    labels=batch["labels"]).loss.item()


@pytest.fixture(scope="module")
def fam_folder(tmp_path_factory):
    return fam_checkpoint(tmp_path_factory.mktemp("trl") / "fam")


def test_sft_trainer_optimises_the_fam_loss_and_trains_fam_init(fam_folder, tmp_path):
    trainer, fam_init = _train(fam_folder, tmp_path)
    records = trainer.records
    assert len(records) == 3
    for step, r in enumerate(records):
        assert r["checkpointing"], "gradient checkpointing was not on during training"
        assert r["dtypes"] == {torch.float32}
        assert abs(r["trained"] - r["direct"]) <= 1e-5, (
            f"step {step}: TRL optimised loss {r['trained']:.6f}, the FAM model's loss on the batch {r['direct']:.6f}")
    # the test can fail: on the first batch (LoRA B = 0, fam_init untouched) the base model's loss is far off
    base = _base_loss(fam_folder, records[0]["batch"])
    assert abs(base - records[0]["direct"]) > 1e-4, f"the batch does not tell FAM from the base model ({base:.6f})"
    trained_fam_init = unwrap_fam_model(trainer.model).fam.fam_init
    assert (trained_fam_init.detach() - fam_init).abs().max().item() > 1e-4, "fam_init did not train"


def test_sft_trainer_loads_a_fam_checkpoint_named_by_path(fam_folder, tmp_path):
    """`SFTTrainer(model="DIR or repo id", args=SFTConfig(model_init_kwargs={"trust_remote_code": True}))`: TRL
    loads the FAM checkpoint (and its tokenizer) itself, and trains FAM."""
    config = _config(tmp_path / "out", max_steps=2,
                     model_init_kwargs={"trust_remote_code": True, "dtype": torch.float32})
    trainer = RecordingSFTTrainer(model=str(fam_folder), args=config, train_dataset=_dataset(), peft_config=_lora())
    trainer.records = []
    trainer.train()
    assert type(unwrap_fam_model(trainer.model)).__name__ == "FAMForCausalLM"
    for r in trainer.records:
        assert abs(r["trained"] - r["direct"]) <= 1e-5, (r["trained"], r["direct"])
    as_saved = AutoModelForCausalLM.from_pretrained(fam_folder).fam.fam_init
    assert (unwrap_fam_model(trainer.model).fam.fam_init.detach() - as_saved).abs().max().item() > 1e-4


@pytest.mark.skipif(not is_torch_bf16_available_on_device("cpu"), reason="this CPU/torch has no bf16 autocast")
def test_sft_trainer_bf16_autocast_optimises_the_fam_loss(fam_folder, tmp_path):
    trainer, _ = _train(fam_folder, tmp_path, bf16=True, max_steps=2)
    for r in trainer.records:
        assert r["dtypes"] == {torch.bfloat16}, f"bf16 training computed in {r['dtypes']}"
        # the fused head scores in tiles, the full-logits route in one product: bf16 rounding may differ (4.8e-7 seen)
        assert abs(r["trained"] - r["direct"]) <= 1e-3, (r["trained"], r["direct"])


@pytest.mark.parametrize("config", [dict(padding_free=True, max_length=None), dict(packing=True),
                                    dict(packing=True, packing_strategy="bfd_split")],
                         ids=["padding_free", "packing_bfd", "packing_bfd_split"])
def test_sft_trainer_refuses_documents_sharing_a_row(fam_folder, tmp_path, config):
    with pytest.raises(ValueError, match="packed") as info:
        _train(fam_folder, tmp_path, per_device_train_batch_size=2, **config)
    assert "\n" not in str(info.value)


def test_sft_trainer_wrapped_packing_runs_fam(fam_folder, tmp_path):
    """packing_strategy="wrapped" concatenates documents and cuts rows, positions counting on (the paper's packing,
    like hf_fam.training.pack_dataset): FAM carries its memory across documents, as it was trained to."""
    trainer, _ = _train(fam_folder, tmp_path, packing=True, packing_strategy="wrapped", max_length=64, max_steps=1)
    for r in trainer.records:
        assert "cu_seq_lens_q" not in r["batch"]
        assert abs(r["trained"] - r["direct"]) <= 1e-5, (r["trained"], r["direct"])


def test_sft_trainer_on_a_converted_checkpoint_asks_for_the_training_base(tmp_path):
    """A converted checkpoint's config.json says fam_update "sink": the adapter would load on it without the update
    it was trained with. The first step refuses in one line; on the base `save_training_base` saved, it trains."""
    from hf_fam.training import save_training_base

    converted = fam_checkpoint(tmp_path / "fam", route="converted")
    model = AutoModelForCausalLM.from_pretrained(converted, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(converted)
    trainer = trl.SFTTrainer(model=model, args=_config(tmp_path / "out", max_steps=1), train_dataset=_dataset(),
                             processing_class=tokenizer, peft_config=_lora())
    with pytest.raises(ValueError, match="save_training_base"):
        trainer.train()

    model = AutoModelForCausalLM.from_pretrained(converted, dtype=torch.float32)
    save_training_base(model, tmp_path / "train-base", tokenizer)
    trainer = trl.SFTTrainer(model=model, args=_config(tmp_path / "out2", max_steps=1), train_dataset=_dataset(),
                             processing_class=tokenizer, peft_config=_lora())
    trainer.train()
    trainer.save_model(tmp_path / "adapter")
    import json

    saved = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert saved["base_model_name_or_path"] == str(tmp_path / "train-base")
