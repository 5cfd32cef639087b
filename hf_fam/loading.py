"""Load a FAM model for the command line and the notebooks: a FAM checkpoint as it is, or a base checkpoint
(Llama, Mistral, Gemma, ...) wrapped into FAM mode on the fly."""

from __future__ import annotations

import os
from dataclasses import dataclass


@dataclass
class FAMOverrides:
    """FAM settings for a base checkpoint (C, M, F); None keeps the checkpoint's (or the paper's) value."""

    block_size: int | None = None
    memory_segments: int | None = None
    fam_length: int | None = None


def resolve_dtype(name: str | None):
    import torch

    if name in (None, "auto"):
        return "auto"
    table = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
             "float16": torch.float16, "fp16": torch.float16}
    if name not in table:
        raise ValueError(f"unknown dtype {name!r}; use one of: auto, {', '.join(table)}")
    return table[name]


def load_fam_model(source: str, *, overrides: FAMOverrides | None = None, dtype: str | None = "auto",
                   device: str = "cpu", revision: str | None = None, token: str | None = None,
                   attn_implementation: str | None = None):
    """Load `source` (a local folder or a Hub id) as a FAM model, in eval mode.

    A FAM checkpoint (model_type "fam") loads with its own settings, which `overrides` may not change.
    A base checkpoint is loaded and wrapped with `FAMForCausalLM.from_base_model`; settings not given in
    `overrides` take the paper's defaults (C=1024, M=3, F=64).

    Returns:
        (model, tokenizer or None)
    """
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from . import FAMForCausalLM
    from .modeling.configuration_fam import DEFAULT_BLOCK_SIZE, DEFAULT_FAM_LENGTH, DEFAULT_MEMORY_SEGMENTS

    overrides = overrides or FAMOverrides()
    if source.startswith(("/", "./", "../", "~")) and not os.path.isdir(os.path.expanduser(source)):
        raise FileNotFoundError(f"no checkpoint folder at {source}")
    hub = dict(revision=revision, token=token)
    config = AutoConfig.from_pretrained(source, **hub)
    kwargs = dict(dtype=resolve_dtype(dtype), **hub)
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    if config.model_type == "fam":
        given = {k: v for k, v in vars(overrides).items() if v is not None and v != getattr(config, k)}
        if given:
            raise ValueError(
                f"{source} is a FAM checkpoint with block_size={config.block_size}, memory_segments="
                f"{config.memory_segments}, fam_length={config.fam_length}; it cannot run with {given}."
            )
        model = AutoModelForCausalLM.from_pretrained(source, **kwargs)
    else:
        base = AutoModelForCausalLM.from_pretrained(source, **kwargs)
        model = FAMForCausalLM.from_base_model(
            base,
            block_size=overrides.block_size or DEFAULT_BLOCK_SIZE,
            memory_segments=DEFAULT_MEMORY_SEGMENTS if overrides.memory_segments is None else overrides.memory_segments,
            fam_length=DEFAULT_FAM_LENGTH if overrides.fam_length is None else overrides.fam_length,
        )
    model.to(device).eval()
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, **hub)
    except (OSError, ValueError):
        tokenizer = None
    return model, tokenizer
