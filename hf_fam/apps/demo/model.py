"""The demo's models: the tiny Llama (`build_base`) and its FAM or BSWA wrapper (`build_model`)."""

from __future__ import annotations

import torch

from .config import DemoConfig
from .data import VOCAB


def build_base(config: DemoConfig):
    """The tiny Llama, deterministic for the seed (full attention, no FAM)."""
    from ...tiny import tiny_model

    return tiny_model(
        "llama", config.seed, attn="sdpa", vocab_size=VOCAB.size, hidden_size=config.hidden_size,
        intermediate_size=config.intermediate_size, num_hidden_layers=config.num_layers,
        num_attention_heads=config.num_heads, num_key_value_heads=config.num_heads, max_position_embeddings=4096,
        tie_word_embeddings=True, pad_token_id=None, bos_token_id=None, eos_token_id=None,
    ).to(config.device)


def build_model(config: DemoConfig, fam_length: int, base=None):
    """FAM (fam_length > 0) or BSWA (fam_length = 0) around `base` (a copy of it), or around a fresh tiny Llama."""
    import copy

    from ...modeling.modeling_fam import FAMForCausalLM

    base = build_base(config) if base is None else copy.deepcopy(base)
    torch.manual_seed(config.seed + 1)  # fam_init
    return FAMForCausalLM.from_base_model(base, block_size=config.block_size, memory_segments=config.memory_segments,
                                          fam_length=fam_length).to(config.device)
