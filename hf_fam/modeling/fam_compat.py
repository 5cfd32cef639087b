"""Everything that differs between the transformers releases hf_fam supports, in one place.

transformers 5.x moves internals between minor releases (the cache argument's name, the output-capture
machinery, the attention registry, the arguments attention functions take). The rest of hf_fam calls the
helpers below and never reaches into transformers' private modules or attention functions itself. This
file ships with every converted checkpoint, so it imports only torch and transformers.
"""

from __future__ import annotations

import contextlib
import contextvars
import inspect
import sys
from collections.abc import Callable, Iterator

import torch
import transformers
from torch import nn
from transformers import AttentionInterface

TRANSFORMERS_VERSION = tuple(int(p) for p in transformers.__version__.split(".")[:2] if p.isdigit())

# The keyword the decoder models take their cache under: `cache` from 5.24, `past_key_values` before.
CACHE_KWARG = "cache" if TRANSFORMERS_VERSION >= (5, 24) else "past_key_values"

# Inner attention implementations FAM can run its block attention with. Both accept an explicit 4D boolean
# mask and any batch size, which the block layout needs; flash kernels take no arbitrary masks.
SUPPORTED_INNER_ATTENTION = ("sdpa", "eager")
FAM_ATTENTION_PREFIX = "fam_"


# Set while a FAM forward runs the decoder (see `inside_fam_forward`).
_IN_FAM_FORWARD: contextvars.ContextVar[bool] = contextvars.ContextVar("hf_fam_in_fam_forward", default=False)


@contextlib.contextmanager
def inside_fam_forward() -> Iterator[None]:
    """Mark the decoder call of a FAM forward: masks are not built inside it (FAM builds its own)."""
    token = _IN_FAM_FORWARD.set(True)
    try:
        yield
    finally:
        _IN_FAM_FORWARD.reset(token)


def in_fam_forward() -> bool:
    return _IN_FAM_FORWARD.get()


def _fam_mask_function(inner: str) -> Callable:
    """The mask function registered under `fam_<inner>`.

    Inside a FAM forward it builds nothing (returns None): FAM builds its own block masks from the 2D padding
    mask, and an (N x N) mask would cost quadratic memory. Outside one, the call comes from a base model that
    shares its modules with a FAM model (`FAMForCausalLM.from_base_model`): it gets its usual mask.
    """

    def fam_mask(*args, **kwargs):
        if _IN_FAM_FORWARD.get():
            return None
        return _mask_interface()[inner](*args, **kwargs)

    return fam_mask


def _mask_interface():
    try:
        from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS
    except ImportError:  # releases without mask functions build no mask for unknown names anyway
        return None
    return ALL_MASK_ATTENTION_FUNCTIONS


def register_attention(fn: Callable) -> None:
    """Register `fn` under `fam_<inner>` for every supported inner implementation, with a mask function
    that builds no mask inside FAM forwards (see `_fam_mask_function`)."""
    masks = _mask_interface()
    for inner in SUPPORTED_INNER_ATTENTION:
        AttentionInterface.register(FAM_ATTENTION_PREFIX + inner, fn)
        if masks is not None:
            masks.register(FAM_ATTENTION_PREFIX + inner, _fam_mask_function(inner))


def inner_attention_function(module: nn.Module, inner: str) -> Callable:
    """The attention function the checkpoint's own code would call for `inner` ("sdpa" or "eager").

    "eager" is the function defined next to the attention module in its modeling file, so family
    specifics (Gemma 2's soft-capping, for example) are kept.
    """
    if inner == "eager":
        modeling_module = sys.modules[type(module).__module__]
        fn = getattr(modeling_module, "eager_attention_forward", None)
        if fn is None:
            raise TypeError(f"{type(module).__name__} has no eager_attention_forward in its modeling module")
        return fn
    return transformers.modeling_utils.ALL_ATTENTION_FUNCTIONS[inner]


# Attention keyword arguments that only make sense for the model's own attention pattern.
DROPPED_ATTENTION_KWARGS = (
    "sliding_window",
    "position_ids",
    "use_cache",
    "cache",
    "past_key_values",
    "is_causal",
    "fam_run",
    "fam_step",
    "output_attentions",
)


def additive_mask(allowed: torch.Tensor, dtype) -> torch.Tensor:
    """Boolean mask (True = attend) -> additive mask: 0 where allowed, the dtype's minimum elsewhere."""
    return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill_(~allowed, torch.finfo(dtype).min)


def call_inner_attention(module, inner, query, key, value, mask, kwargs):
    """Call the checkpoint's own attention function (sdpa or eager) with an explicit mask: boolean
    (True = attend), or additive in the query's dtype."""
    fn = inner_attention_function(module, inner)
    kw = {k: v for k, v in kwargs.items() if k not in DROPPED_ATTENTION_KWARGS}
    if mask is not None and inner == "eager" and mask.dtype == torch.bool:
        mask = additive_mask(mask, query.dtype)  # eager adds the mask to the scores
    if inner == "sdpa":
        kw["is_causal"] = False
    return fn(module, query, key, value, mask, **kw)


@contextlib.contextmanager
def plain_layer_call(layer: nn.Module) -> Iterator[None]:
    """Run a decoder layer on FAM tokens from inside another computation.

    Gradient checkpointing is switched off for the call (the enclosing layer is already checkpointed, and
    the FAM chain is recomputed with it), and transformers' output capturing (`output_hidden_states`) is
    paused so FAM tokens never show up among the model's hidden states.
    """
    from transformers.utils import output_capturing

    was_checkpointing = getattr(layer, "gradient_checkpointing", False)
    if was_checkpointing:
        layer.gradient_checkpointing = False
    token = output_capturing._active_collector.set(None)
    try:
        yield
    finally:
        output_capturing._active_collector.reset(token)
        if was_checkpointing:
            layer.gradient_checkpointing = True


def accepts_kwarg(fn: Callable, name: str) -> bool:
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False
    return name in params or any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())


def sdpa_supports_gqa() -> bool:
    return "enable_gqa" in inspect.signature(torch.nn.functional.scaled_dot_product_attention).parameters


def uses_reentrant_checkpointing(decoder: nn.Module) -> bool:
    """Whether the decoder's layers are checkpointed with torch's reentrant checkpoint."""
    for layer in getattr(decoder, "layers", ()):
        if getattr(layer, "gradient_checkpointing", False):
            func = getattr(layer, "_gradient_checkpointing_func", None)
            keywords = getattr(func, "keywords", None) or {}
            return bool(keywords.get("use_reentrant", False))
    return False
