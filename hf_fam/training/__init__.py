"""Training FAM models: LoRA through PEFT, the paper's recipe (Random State Passing, Random Position Offset),
long-context data (packing; the passkey task is `hf_fam.tasks.passkey`) and the fine-tuning loop behind
`hf-fam finetune`.

The modules: `options` (every training option, declared once for the API and the command line), `data`, `lora`,
`recipe` (with `recipe_callback`, its state in the `Trainer`'s checkpoints), `loss_chunk` (the chunked loss under
loops such as `Trainer`), `finetune` (the loop), `continued` (an adapter trained further), `heldout` (the loss on
sequences kept out of training), `training_base` (the base an adapter trains on), `outputs` and `resume` (what a
run writes and how it resumes).
The names below load on first use (PEP 562): importing `hf_fam.training.options` for `hf-fam finetune --help`
must not pull in torch and PEFT. accelerate and the Trainer are imported only inside the functions that use them.
"""

from __future__ import annotations

import sys
import types

from .._lazy import lazy_exports

# name -> the module that defines it
_EXPORTS = {
    "DataOptions": ".options",
    "FAMDataCollator": ".data",
    "FAMRecipeCallback": ".recipe_callback",
    "FAMRecipeConfig": ".options",
    "FAMTrainingRecipe": ".recipe",
    "FinetuneConfig": ".options",
    "LoraOptions": ".options",
    "ModelOptions": ".options",
    "PasskeyConfig": "hf_fam.tasks.passkey",
    "SyntheticPasskeyVocab": "hf_fam.tasks.passkey",
    "TrainOptions": ".options",
    "attach_recipe": ".recipe",
    "beyond_reach": "hf_fam.tasks.passkey",
    "enable_loss_chunk": ".loss_chunk",
    "fam_lora_config": ".lora",
    "finetune": ".finetune",
    "load_text_dataset": ".data",
    "max_rope_wavelength": ".recipe",
    "mix_datasets": ".data",
    "norm_module_names": ".lora",
    "pack_dataset": ".data",
    "save_adapter": ".lora",
    "save_lora_start": ".lora",
    "save_training_base": ".training_base",
    "passkey_dataset": "hf_fam.tasks.passkey",
    "passkey_exact_match": "hf_fam.tasks.passkey",
    "unwrap_fam_model": ".lora",
}

__all__ = sorted(_EXPORTS)


__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)


class _TrainingPackage(types.ModuleType):
    """`hf_fam.training.finetune` is the function, as it always was, also once the module of the same name
    has been imported: importing a submodule binds it on its package, which here would hide the function."""

    def __setattr__(self, name: str, value) -> None:
        if name == "finetune" and isinstance(value, types.ModuleType):
            return  # the module stays reachable as sys.modules["hf_fam.training.finetune"]
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _TrainingPackage
