"""Tiny FAM checkpoints with a tokenizer, saved in a folder, for the client tests (TRL, Trainer, pipeline,
lm-evaluation-harness, accelerate, device_map): the clients load them as a user would, by path."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import hf_fam
from hf_fam.checkpoint_io.convert import ConvertOptions, convert
from hf_fam.tiny import make_tiny_checkpoint

# C = 8, M = 1: a window of 16 tokens, so the test texts (40-300 tokens) are many blocks long
SETTINGS = dict(block_size=8, memory_segments=1, fam_length=4)

TEXTS = [
    "the quick brown fox jumps over the lazy dog",
    "a feedback attention memory reads long input block by block",
    "lorem ipsum dolor sit amet, consectetur adipiscing elit, sed do eiusmod",
    "pack my box with five dozen liquor jugs",
    "how vexingly quick daft zebras jump",
    "sphinx of black quartz, judge my vow; the five boxing wizards jump quickly",
    "one two three four five six seven eight nine ten eleven twelve",
    "working memory lets a transformer carry information past its attention window",
]


def tiny_base(folder: Path, family: str = "llama", seed: int = 0, sharpen: float = 4.0, **overrides) -> Path:
    """A tiny random `family` checkpoint with the byte-level tokenizer (vocab 259), its query/key projections
    scaled by `sharpen` so that attention (and so the window FAM imposes) matters for the logits."""
    path = make_tiny_checkpoint(folder, family=family, seed=seed, **overrides)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.q_proj.weight.mul_(sharpen)
            layer.self_attn.k_proj.weight.mul_(sharpen)
    model.save_pretrained(path)
    return path


def fam_checkpoint(folder: Path, family: str = "llama", route: str = "saved", seed: int = 0, **overrides) -> Path:
    """A FAM checkpoint with its tokenizer in `folder`.

    route "saved": the base loaded and wrapped with `FAMForCausalLM.from_base_model`, then `save_pretrained`;
    route "converted": `hf_fam.checkpoint_io.convert` of the base folder.
    `overrides`: FAM settings and base-config fields.
    """
    folder = Path(folder)
    settings = {k: overrides.pop(k) if k in overrides else v for k, v in SETTINGS.items()}
    base = tiny_base(folder.parent / f"{folder.name}-base", family=family, seed=seed, **overrides)
    if route == "converted":
        convert(base, folder, ConvertOptions(**settings, seed=seed, progress=False))
    elif route == "saved":
        model = hf_fam.FAMForCausalLM.from_base_model(AutoModelForCausalLM.from_pretrained(base), **settings)
        torch.manual_seed(seed)
        with torch.no_grad():
            model.fam.fam_init.normal_(0.0, 1.0)  # a memory far from zero, so FAM changes the logits
        model.save_pretrained(folder)
        AutoTokenizer.from_pretrained(base).save_pretrained(folder)
    else:
        raise ValueError(f"route must be 'saved' or 'converted', got {route!r}")
    return folder


def base_folder(fam_folder: Path) -> Path:
    """The base checkpoint `fam_checkpoint` made next to `fam_folder`."""
    fam_folder = Path(fam_folder)
    return fam_folder.parent / f"{fam_folder.name}-base"


def trained_lora(folder: Path, task_type: str | None = None):
    """A LoRA PeftModel of the FAM checkpoint in `folder` whose adapter changes the logits, as training leaves one
    (LoRA's B not zero, `fam_init` trained in full via modules_to_save); in eval mode. `task_type` None is how
    many examples write a LoraConfig."""
    from peft import LoraConfig, get_peft_model

    model = AutoModelForCausalLM.from_pretrained(folder)
    peft = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj", "down_proj"],
                                            modules_to_save=["fam"], init_lora_weights=False, task_type=task_type))
    with torch.no_grad():
        peft.base_model.model.fam.modules_to_save.default.fam_init.add_(0.5)
    return peft.eval()
