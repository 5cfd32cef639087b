"""Training FAM models: LoRA through PEFT, the paper's recipe (Random State Passing, Random Position Offset),
long-context data (packing, passkey) and the fine-tuning loop behind `hf-fam finetune`.

accelerate and the Trainer are imported only inside the functions that use them.
"""

from __future__ import annotations

from .data import FAMDataCollator, load_text_dataset, pack_dataset
from .passkey import PasskeyConfig, SyntheticPasskeyVocab, beyond_reach, passkey_dataset, passkey_exact_match

__all__ = [
    "FAMDataCollator",
    "PasskeyConfig",
    "SyntheticPasskeyVocab",
    "beyond_reach",
    "load_text_dataset",
    "pack_dataset",
    "passkey_dataset",
    "passkey_exact_match",
]
