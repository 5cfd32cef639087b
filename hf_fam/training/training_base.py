"""The base an adapter is trained on: `save_training_base(model, folder)`.

A converted checkpoint is saved in its zero-shot start (`fam_update="sink"`, a memory of BOS slots), which
training cannot use: training runs the paper's update (a training forward switches to it) and gives a BOS memory
content slots (docs/training.md, "Where training starts the memory"). A full model saved after training carries
its config; an adapter does not, and names its base by path. So an adapter must name a base saved as it was
trained: this module saves it, and FAM refuses to train an adapter whose base's config.json says "sink", or is
not a FAM checkpoint at all, as for a model put in FAM mode in memory (`modeling_fam._refuse_adapter_unlike_training`).
`hf-fam finetune` saves the same base as OUT/fam_base.

Example:
```python
>>> model = AutoModelForCausalLM.from_pretrained("llama-fam", trust_remote_code=True)
>>> save_training_base(model, "llama-fam-train", tokenizer=tokenizer)  # the paper's update, content slots
>>> trainer = SFTTrainer(model=model, ..., peft_config=fam_lora_config(model))  # the adapter names the folder
```
"""

from __future__ import annotations

import logging
import math
from pathlib import Path

import torch

from ..modeling.fam_settings import ZERO_SHOT_FAM_UPDATE
from .lora import unwrap_fam_model
from .options import DEFAULT_MEMORY_START_TEXT

logger = logging.getLogger("hf_fam.training")


def content_slots(model, tokenizer, text: str) -> bool:
    """Give a BOS-start memory content slots before training (`training_fam_init`); anything else is kept.
    Returns whether the memory changed."""
    from ..checkpoint_io.fam_init import training_fam_init

    if tokenizer is None:
        return False
    memory = unwrap_fam_model(model).fam
    start = training_fam_init(memory.fam_init, tokenizer, model.get_input_embeddings().weight, text)
    if start is None:
        return False
    with torch.no_grad():
        memory.fam_init.copy_(start)
    logger.info("memory slots 1..%d start as the token embeddings of %r; slot 0 keeps the sink",
                start.shape[0] - 1, text)
    return True


def is_training_start(model, tokenizer=None, memory_start_text: str = DEFAULT_MEMORY_START_TEXT) -> bool:
    """Whether `training_start` would leave `model` as it is (the paper's update, and no content slots to give)."""
    from ..checkpoint_io.fam_init import training_fam_init

    fam_model = unwrap_fam_model(model)
    if any(getattr(c, "fam_update", "paper") == ZERO_SHOT_FAM_UPDATE for c in _fam_configs(fam_model)):
        return False
    return tokenizer is None or training_fam_init(fam_model.fam.fam_init, tokenizer,
                                                  model.get_input_embeddings().weight, memory_start_text) is None


def training_start(model, tokenizer=None, memory_start_text: str = DEFAULT_MEMORY_START_TEXT) -> bool:
    """Put `model` (a FAM model, not yet wrapped by PEFT) in the start training uses, in place: the paper's
    update, and content slots for a BOS-start memory (with a tokenizer; `memory_start_text` '' keeps it).
    Returns whether anything changed."""
    fam_model = unwrap_fam_model(model)
    changed = False
    for config in _fam_configs(fam_model):
        if getattr(config, "fam_update", "paper") == ZERO_SHOT_FAM_UPDATE:
            logger.info("switching fam_update from the zero-shot 'sink' start to 'paper' for training")
            config.fam_update = "paper"
            changed = True
    return content_slots(fam_model, tokenizer, memory_start_text) or changed


def _fam_configs(model) -> list:
    """The FAM configs `model` runs by: its own (a FAMForCausalLM, hf_fam's class or a checkpoint's remote code)
    and its FAM backbone's (the one a model patched with `hf_fam.patch` keeps beside its own base config)."""
    found = [m.config for m in model.modules() if type(m).__name__ == "FAMModel"]
    if getattr(model.config, "model_type", None) == "fam":
        found.append(model.config)
    return list({id(c): c for c in found}.values())


def save_training_base(model, folder, tokenizer=None, memory_start_text: str = DEFAULT_MEMORY_START_TEXT) -> Path:
    """Put `model` in the start training uses (`training_start`) and save it to `folder` as the base the adapters
    trained on it will name (`model.name_or_path` becomes the folder). Call it before wrapping the model with
    PEFT (`get_peft_model`, or a trainer's `peft_config`).

    Args:
        model: a FAM model (`FAMForCausalLM` or a model patched with `hf_fam.patch`), not PEFT-wrapped.
        folder: where to save it (with the tokenizer, when given).
        tokenizer: the model's tokenizer: saved with it, and needed for the content slots.
        memory_start_text: the content slots' text ('' keeps a BOS memory).

    Returns:
        The folder.
    """
    folder = Path(folder)
    fam_model = unwrap_fam_model(model)
    if getattr(fam_model, "peft_config", None):
        raise ValueError("save_training_base takes the model before PEFT wraps it (its adapter would be saved into "
                         "the base): call it first, then get_peft_model or the trainer")
    from . import text_check

    device = next(fam_model.parameters()).device
    text = text_check.text_ids(tokenizer, fam_model.fam_settings.block_size)
    given = text_check.text_loss(fam_model, text, device)
    if training_start(fam_model, tokenizer, memory_start_text) and given is not None:
        start = text_check.text_loss(fam_model, text, device)
        worse = start - given > math.log(text_check.WORSE_BY)  # perplexity more than doubled: say so loudly
        (logger.warning if worse else logger.info)(
            "the training start reads plain text within one block (Python's documentation, %d tokens) at loss %.4f "
            "where the model as given reads %.4f: training begins from a worse language model, which a short run "
            "does not repair (docs/training.md, 'Where training starts the memory')", text.shape[1], start, given)
    fam_model.save_pretrained(folder)
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)
    fam_model.name_or_path = fam_model.config._name_or_path = str(folder)
    return folder


__all__ = ["content_slots", "is_training_start", "save_training_base", "training_start"]
