"""How a FAM model wraps a loaded base model: finding its decoder slot, copying its head without touching it,
and running the head's own forward with a FAM backbone in the decoder's place (`modeling_fam`, `hf_fam.patch`).

This file ships with every converted checkpoint: it imports only torch and its siblings.
"""

from __future__ import annotations

import copy

from torch import nn

from .fam_adapters import DecoderAdapter
from .fam_compat import set_output_cache
from .fam_forward import with_fam_state


def child_name(parent: nn.Module, child: nn.Module) -> str:
    for name, module in parent.named_children():
        if module is child:
            return name
    raise ValueError(f"{type(child).__name__} is not a child of {type(parent).__name__}")


def decoder_slot(model: nn.Module, adapter: DecoderAdapter) -> tuple[str, nn.Module]:
    """(attribute name, decoder stack) of a causal LM; a FAM backbone found there is unwrapped."""
    decoder = adapter.decoder(model)
    if decoder is model:
        raise TypeError(f"{type(model).__name__} has no decoder stack under a child module.")
    name = child_name(model, decoder)
    return name, getattr(decoder, "_fam_decoder", decoder)


def detached_copy(model: nn.Module) -> nn.Module:
    """A shallow copy of `model` with its own child/parameter/buffer tables: replacing a child of the copy
    leaves `model` as it was (the children themselves are shared)."""
    head = copy.copy(model)
    for table in ("_modules", "_parameters", "_buffers"):
        object.__setattr__(head, table, dict(getattr(model, table)))
    return head


def fam_lm_forward(head_forward, **kwargs):
    """Run a causal LM's own forward (`head_forward`) whose decoder is a FAMModel, and attach the final FAM.

    The one forward path of converted (FAMForCausalLM) and patched models: the head's forward computes
    logits, loss and soft-capping exactly as the family does; FAM runs inside its decoder call.
    """
    sink: dict = {}
    outputs = head_forward(fam_output=sink, **kwargs)
    if sink.get("fam_state") is not None:
        outputs = with_fam_state(outputs, sink["fam_state"])
    if sink.get("cache") is not None:
        set_output_cache(outputs, sink["cache"])  # `.cache` on every supported release
    return outputs
