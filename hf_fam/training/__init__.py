"""Training FAM models: LoRA through PEFT, the paper's recipe (Random State Passing, Random Position Offset),
long-context data (packing; the passkey task is `hf_fam.tasks.passkey`) and the fine-tuning loop behind
`hf-fam finetune`.

accelerate and the Trainer are imported only inside the functions that use them.
"""

from __future__ import annotations

from ..tasks.passkey import PasskeyConfig, SyntheticPasskeyVocab, beyond_reach, passkey_dataset, passkey_exact_match
from .data import FAMDataCollator, load_text_dataset, pack_dataset
from .finetune import DataOptions, FinetuneConfig, LoraOptions, ModelOptions, TrainOptions, finetune
from .lora import fam_lora_config, unwrap_fam_model
from .recipe import FAMRecipeConfig, FAMTrainingRecipe, attach_recipe, max_rope_wavelength

__all__ = [
    "DataOptions",
    "FAMDataCollator",
    "FAMRecipeConfig",
    "FAMTrainingRecipe",
    "FinetuneConfig",
    "LoraOptions",
    "ModelOptions",
    "PasskeyConfig",
    "SyntheticPasskeyVocab",
    "TrainOptions",
    "attach_recipe",
    "beyond_reach",
    "fam_lora_config",
    "finetune",
    "load_text_dataset",
    "max_rope_wavelength",
    "pack_dataset",
    "passkey_dataset",
    "passkey_exact_match",
    "unwrap_fam_model",
]
