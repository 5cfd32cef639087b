"""`hf-fam finetune ADAPTER`: more training for a LoRA adapter of a FAM checkpoint (what `hf-fam finetune` saved, or
a Hub repo `hf-fam push` shared), saved as a new adapter for the same base.

The base is the FAM checkpoint the adapter names, loaded as `hf-fam eval ADAPTER` loads it (a Hub base at the
commit the adapter pins), and the adapter goes on it trainable (`PeftModel.from_pretrained(..., is_trainable=True)`):
its LoRA weights and what it trains in full (`fam_init`, the norms) start where the adapter left them. What the
adapter fixes is not an option here: its LoRA rank, alpha, dropout, targets and trained modules, and the memory's
start (the adapter's own `fam_init`); given, they are refused in one line. The optimizer, learning-rate schedule
and Random State Passing start anew (`--resume` continues an interrupted run; this continues a finished one).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import fields

from ..checkpoint_io.adapter_card import module_names
from .options import FinetuneConfig, LoraOptions, ModelOptions

logger = logging.getLogger("hf_fam.training")


def adapter_to_continue(config: FinetuneConfig, given: Iterable[str] | None = None) -> dict | None:
    """The adapter_config.json of `config.model.path` when it is a LoRA adapter to train further, with the options
    checked; None for a checkpoint.

    `given`: the names of the options that were set (the command line knows them, a default included: `--lora-rank
    64`); None counts those that differ from their defaults, all an options object can tell."""
    from ..runtime.loading import find_adapter

    adapter = find_adapter(config.model.path)
    if adapter is None:
        return None
    source = config.model.path
    if config.lora.full:
        raise ValueError(f"{source} is a LoRA adapter: --full trains every weight of a checkpoint; train the adapter "
                         "further without --full, or pass its merged model (hf-fam finetune --merge)")
    given = None if given is None else set(given)
    fixed = [(config.lora, f) for f in fields(LoraOptions) if f.name not in ("full", "train_embeddings")]
    fixed.append((config.model, ModelOptions.__dataclass_fields__["memory_start_text"]))
    named = [_flag(type(options), f.name) for options, f in fixed
             if (f.name in given if given is not None else getattr(options, f.name) != f.default)]
    if named:
        raise ValueError(
            f"{source} is a LoRA adapter, trained further as it is (r={adapter.get('r')}, targets "
            f"{module_names(adapter.get('target_modules'), quote='')}, its own fam_init): drop {', '.join(named)}, "
            f"or train a new adapter from its base {adapter.get('base_model_name_or_path')}"
        )
    return adapter


def load_adapter_base(source: str, adapter: dict, options: ModelOptions, device="cpu"):
    """(the FAM base of the adapter at `source`, in train mode, the tokenizer (the adapter's, else the base's), the
    base's path or Hub id). Refuses a base in the zero-shot start: training switches it to the paper's update,
    and `hf-fam finetune` saved the base it trained on as OUT/fam_base."""
    from ..runtime.loading import adapter_base, adapter_tokenizer, load_fam_model

    base, revision, base_config = adapter_base(source, adapter)
    if getattr(base_config, "fam_update", "paper") == "sink":
        raise ValueError(f"the base of the adapter {source}, {base}, is in the zero-shot start (fam_update 'sink'), "
                         "which training switches to the paper's update: continue from an adapter whose base is the "
                         "checkpoint its run trained on (hf-fam finetune's OUT/fam_base)")
    model, tokenizer = load_fam_model(base, revision=revision, **options.loading(device))
    tokenizer = adapter_tokenizer(source, tokenizer)
    logger.info("continuing the adapter %s on its base %s%s", source, base, f" at {revision}" if revision else "")
    return model.train(), tokenizer, base


def trainable_adapter(model, source: str):
    """The adapter at `source` on `model` (its base), trainable; returns (PeftModel, a description to log)."""
    from peft import PeftModel

    peft_model = PeftModel.from_pretrained(model, source, is_trainable=True)
    config = peft_model.peft_config["default"]
    trained = f" + {module_names(config.modules_to_save, quote='')}" if config.modules_to_save else ""
    return peft_model, (f"LoRA r={config.r} on {module_names(config.target_modules, quote='')}{trained}, "
                        f"continued from {source}")


def _flag(options, name: str) -> str:
    field = next(f for f in fields(options) if f.name == name)
    flag = field.metadata.get("flag", name)
    return flag if isinstance(flag, str) else flag[0]


__all__ = ["adapter_to_continue", "load_adapter_base", "trainable_adapter"]
