"""Everything that differs between the transformers releases hf_fam supports, in one place.

transformers 5.x moves internals between minor releases (the cache argument's name, the output-capture
machinery, the attention registry, the arguments attention functions take). The rest of hf_fam calls the
helpers below and never reaches into transformers' private modules or attention functions itself. The torch
releases differ too, where FAM meets it: sdpa's GQA argument, and autocast's cast cache under gradient
checkpointing (`autocast_without_cache`). So does a bitsandbytes quirk FAM training must refuse
(`refuse_repacked_4bit_layers`). This file ships with every converted checkpoint, so it imports only
torch and transformers.

Differences inside the supported range are detected by feature (a signature, a field, a module), never by
version number. The range itself is checked once, at import, before anything else touches transformers'
internals: a checkpoint's code run under a transformers it was not tested with stops at load with one line,
not deep inside a forward.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import functools
import inspect
import os
import sys
from collections.abc import Callable, Iterator

import transformers

# The oldest and newest transformers minor releases this code is tested with (pyproject.toml declares the
# same range; scripts/check_transformers.py tests a new release and raises the ceiling).
SUPPORTED_TRANSFORMERS = ("5.4", "5.25")
# Set to 1 to run this code under a transformers outside that range anyway (untested; for trying a new release).
ALLOW_UNTESTED_ENV = "HF_FAM_ALLOW_UNTESTED_TRANSFORMERS"


class UnsupportedTransformersError(ImportError):
    """The installed transformers is outside the range this FAM code supports."""


def _minor(version: str) -> tuple[int, int]:
    """'5.24.0' -> (5, 24); '5.25.0.dev0' -> (5, 25)."""
    numbers = []
    for piece in version.split(".")[:2]:
        digits = ""
        for ch in piece:
            if not ch.isdigit():
                break
            digits += ch
        numbers.append(int(digits or 0))
    return tuple((numbers + [0, 0])[:2])  # type: ignore[return-value]


def supported_range_spec() -> str:
    """The range as a pip requirement specifier, e.g. ">=5.4,<5.25"."""
    floor, ceiling = SUPPORTED_TRANSFORMERS
    major, minor = _minor(ceiling)
    return f">={floor},<{major}.{minor + 1}"


def unsupported_transformers_message(version: str) -> str | None:
    """One line naming the installed version, the supported range and the fix; None inside the range."""
    floor, ceiling = (_minor(v) for v in SUPPORTED_TRANSFORMERS)
    if floor <= _minor(version) <= ceiling:
        return None
    spec = supported_range_spec()
    if _minor(version) < floor:
        fix = f"upgrade transformers: pip install 'transformers{spec}'"
    else:
        fix = (f"install a supported one (pip install 'transformers{spec}'), or refresh this checkpoint's code with a "
               "newer hf_fam: pip install -U hf-fam && hf-fam verify --refresh-code CHECKPOINT_FOLDER "
               "(weights untouched)")
    return (f"hf_fam: transformers {version} is installed, but this FAM code supports transformers {spec} only; fix: "
            f"{fix}. To try it anyway (untested), set {ALLOW_UNTESTED_ENV}=1.")


def check_transformers_version(version: str | None = None) -> None:
    """Raise UnsupportedTransformersError (one line) when transformers is outside the supported range."""
    message = unsupported_transformers_message(version or transformers.__version__)
    if message is not None and os.environ.get(ALLOW_UNTESTED_ENV, "") not in ("1", "true", "True", "yes"):
        raise UnsupportedTransformersError(message)


check_transformers_version()

import torch  # noqa: E402
from torch import nn  # noqa: E402
from transformers import AttentionInterface  # noqa: E402
from transformers.modeling_outputs import CausalLMOutputWithPast  # noqa: E402

# transformers before 5.18 load a PEFT adapter (`from_pretrained(ADAPTER)`, `model.load_adapter`) without the
# weights of its `modules_to_save`, the whole modules an adapter trains (a FAM adapter's `fam_init` and norms, a
# classifier's `score`), which then run as the base had them: plain models too (seen on 5.4, 5.12, 5.13, 5.15, 5.16
# and 5.17 with PEFT 0.22; 5.18, 5.22 and 5.25 load them)
ADAPTER_MODULES_TO_SAVE_LOADED = _minor(transformers.__version__) >= (5, 18)


def load_adapter_checked(model, load_adapter, *args, **kwargs):
    """`load_adapter(*args, **kwargs)` (transformers' `load_adapter` of `model`, which `from_pretrained(ADAPTER)`
    calls too), then, where this transformers left out the new adapters' modules_to_save, take them off again and
    raise one line naming the fix (the model would run silently wrong)."""
    before = set(getattr(model, "peft_config", None) or {})
    result = load_adapter(*args, **kwargs)
    if ADAPTER_MODULES_TO_SAVE_LOADED:
        return result
    configs = getattr(model, "peft_config", None) or {}
    loaded = sorted(set(configs) - before)
    modules = sorted({m for name in loaded for m in (getattr(configs.get(name), "modules_to_save", None) or [])})
    if not modules:
        return result
    for name in loaded:
        model.delete_adapter(name)
    raise ValueError(
        f"transformers {transformers.__version__} loads a PEFT adapter without the weights of its modules_to_save "
        f"({', '.join(modules)}), so the model would run without what the adapter trained there: load it with PEFT "
        "instead (AutoPeftModelForCausalLM.from_pretrained(ADAPTER, trust_remote_code=True), or the AutoPeftModel "
        "class of its head; PeftModel.from_pretrained(model, ADAPTER)), or upgrade transformers to 5.18 or newer."
    )


# The name a model's cache goes by, as a forward argument and as an output field: `cache` in newer releases
# (5.24), `past_key_values` before. Read from the outputs' declared fields.
_OUTPUT_FIELDS = {field.name for field in dataclasses.fields(CausalLMOutputWithPast)}
CACHE_KWARG = "cache" if "cache" in _OUTPUT_FIELDS else "past_key_values"


def output_cache(outputs):
    """The cache on any model's output (FAM or plain), under the name this transformers gives it (`.cache` is a
    plain model's from 5.24 only)."""
    return getattr(outputs, CACHE_KWARG)


def set_output_cache(outputs, cache) -> None:
    """Put `cache` on a model output under the name this transformers reads (`outputs[CACHE_KWARG]`).

    Where that name is `past_key_values`, the output also answers `.cache` (an attribute, not a key: the
    output's fields and tuple form stay as transformers defines them), so `model(...).cache` works on every
    supported release.
    """
    outputs[CACHE_KWARG] = cache
    if CACHE_KWARG != "cache":
        object.__setattr__(outputs, "cache", cache)


# Inner attention implementations FAM can run its block attention with. Both accept an explicit 4D boolean
# mask and any batch size, which the block layout needs; flash kernels take no arbitrary masks.
SUPPORTED_INNER_ATTENTION = ("sdpa", "eager")
FAM_ATTENTION_PREFIX = "fam_"


def needs_eager_attention(base_model: nn.Module) -> bool:
    """Whether the base model's attention must run eager to be computed as its architecture defines it.

    Soft-capped attention logits (Gemma 2) need eager: sdpa cannot cap them. Newer releases declare that
    (`_supports_sdpa = False`); older ones (5.5) allow sdpa there and silently drop the capping.
    """
    if not getattr(type(base_model), "_supports_sdpa", True):
        return True
    return getattr(base_model.config, "attn_logit_softcapping", None) is not None


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


def _has_activation_checkpointing() -> bool:
    return hasattr(transformers.PreTrainedModel, "activation_checkpointing_enable")


def checkpointing_call() -> str:
    """The call that turns on non-reentrant checkpointing in the installed transformers, for messages:
    `gradient_checkpointing_enable` was renamed `activation_checkpointing_enable` in 5.23 (the old name warns
    from 5.25)."""
    if _has_activation_checkpointing():
        return "model.activation_checkpointing_enable(activation_checkpointing_kwargs={'use_reentrant': False})"
    return "model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={'use_reentrant': False})"


def enable_checkpointing(model: nn.Module) -> None:
    """Turn on non-reentrant activation (gradient) checkpointing of the decoder layers, under either name.

    Non-reentrant only: the FAM chain inside a layer reads tensors that are not inputs of the checkpointed call
    (the layer's FAM state), which reentrant checkpointing cannot backpropagate into (it fails with "Trying to
    backward through the graph a second time").
    """
    kwargs = {"use_reentrant": False}
    if _has_activation_checkpointing():  # the same question checkpointing_call() asks: one answer for both
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def checkpointing_training_args() -> dict:
    """`TrainingArguments` keywords for non-reentrant checkpointing under the installed transformers' names
    (`activation_checkpointing` from 5.23, `gradient_checkpointing` before)."""
    import dataclasses

    prefix = "activation" if "activation_checkpointing" in {
        f.name for f in dataclasses.fields(transformers.TrainingArguments)} else "gradient"
    return {f"{prefix}_checkpointing": True, f"{prefix}_checkpointing_kwargs": {"use_reentrant": False}}


def accepts_kwarg(fn: Callable, name: str) -> bool:
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False
    return name in params or any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())


def sdpa_supports_gqa() -> bool:
    return "enable_gqa" in inspect.signature(torch.nn.functional.scaled_dot_product_attention).parameters


@contextlib.contextmanager
def autocast_without_cache(device_type: str) -> Iterator[None]:
    """The autocast now active (on `device_type` and the CPU), without its cast cache; nothing when none is.

    Autocast keeps one cast of each weight that requires grad for its whole region. A checkpointed region whose
    weights were already used (and cast) before it finds its casts made in the forward and makes them itself
    when recomputed in backward: the saved tensors differ, and torch's non-reentrant checkpoint stops with
    "Recomputed values ... have different metadata" (seen with torch 2.6.0 and bf16 autocast on the CPU; 2.13.0
    tolerates it). FAM uses a layer's weights more than once per forward (the block, the chain's update steps).
    Without the cache each use casts for itself, in the forward and in the recompute alike, and its gradient
    reaches the fp32 weight on its own.
    """
    if not torch.is_autocast_cache_enabled():
        yield
        return
    with contextlib.ExitStack() as stack:
        for kind in sorted({device_type, "cpu"}):
            if torch.is_autocast_enabled(kind):
                stack.enter_context(torch.autocast(kind, dtype=torch.get_autocast_dtype(kind), cache_enabled=False))
        yield


def uses_checkpointing(decoder: nn.Module) -> bool:
    """Whether gradient checkpointing is on: transformers 5 sets it on each layer (`GradientCheckpointingLayer`),
    not on the decoder stack."""
    return any(getattr(layer, "gradient_checkpointing", False) for layer in getattr(decoder, "layers", ()))


def uses_reentrant_checkpointing(decoder: nn.Module) -> bool:
    """Whether the decoder's layers are checkpointed with torch's reentrant checkpoint."""
    for layer in getattr(decoder, "layers", ()):
        if getattr(layer, "gradient_checkpointing", False):
            func = getattr(layer, "_gradient_checkpointing_func", None)
            keywords = getattr(func, "keywords", None)
            if keywords is None:  # not transformers' partial of torch's checkpoint: nothing to read
                return False
            # torch's checkpoint is reentrant when not told (with a warning): kwargs without the key are reentrant
            return bool(keywords.get("use_reentrant", True))
    return False


def settle_unstated_reentrancy(decoder: nn.Module) -> None:
    """Checkpointed layers whose checkpoint kwargs leave `use_reentrant` out run non-reentrant.

    torch picks the reentrant variant when not told (warning that the choice should be explicit, and recommending
    the other), and PEFT's `prepare_model_for_kbit_training` (the QLoRA recipe) turns checkpointing on with empty
    kwargs. FAM needs the non-reentrant variant (`enable_checkpointing`); both compute the same gradients, so the
    unstated choice is made for it. A stated `use_reentrant=True` is kept, for the caller to refuse."""
    for layer in getattr(decoder, "layers", ()):
        func = getattr(layer, "_gradient_checkpointing_func", None)
        keywords = getattr(func, "keywords", None)
        if getattr(layer, "gradient_checkpointing", False) and keywords is not None and "use_reentrant" not in keywords:
            layer._gradient_checkpointing_func = functools.partial(func, use_reentrant=False)


def repacked_4bit_layers(module: nn.Module) -> list[str]:
    """The names of the bitsandbytes 4-bit layers in `module` whose weights its CPU backend repacked for its
    inference kernel (bitsandbytes 0.50, on CPUs with AVX512-BF16, at the layer's first forward in eval mode
    without gradients). That kernel has no backward: the layer passes no gradient to its input, and torch only
    warns. Read from the weights' quantization state, without importing bitsandbytes."""
    return [name for name, m in module.named_modules()
            if getattr(getattr(getattr(m, "weight", None), "quant_state", None), "packing_format_for_cpu", False)]


def refuse_repacked_4bit_layers(decoder: nn.Module) -> None:
    """Refuse a training forward through repacked 4-bit layers (`repacked_4bit_layers`): every gradient below
    them, the memory's among them, would be silently lost."""
    if "bitsandbytes" not in sys.modules:  # nothing can be quantized: no walk over the modules on every step
        return
    repacked = repacked_4bit_layers(decoder)
    if repacked:
        raise ValueError(
            f"{len(repacked)} 4-bit layers (first {repacked[0]}) were repacked for bitsandbytes' CPU inference kernel "
            "by a forward in eval mode, and pass no gradients: training through them would lose every gradient "
            "below them. Load the model again and call hf_fam.runtime.quantize.keep_trainable(model) before its "
            "first forward."
        )


# What loading sets on a model and its clients read: the quantizers' markers (HfQuantizer.preprocess_model /
# postprocess_model and the bitsandbytes quantizers), read by PEFT (`prepare_model_for_kbit_training`), TRL and the
# Trainer to know a model is quantized, and the device map accelerate dispatched it with, read by the Trainer
# (a model spread over devices is not moved) and by `save_pretrained` (offloaded weights are read back to be saved).
LOAD_MARKERS = ("hf_quantizer", "is_quantized", "quantization_method", "is_loaded_in_4bit", "is_loaded_in_8bit",
                "hqq_quantized", "hf_device_map")


def copy_load_markers(source: nn.Module, target: nn.Module) -> None:
    """Give `target`, a model wrapping `source` module for module under the same names, the markers `source` was
    loaded with. Without them PEFT's QLoRA preparation and TRL skip a quantized model silently, the Trainer
    fine-tunes its quantized weights in full, a cast to another dtype is let through, and weights offloaded to disk
    are saved as meta tensors."""
    for name in LOAD_MARKERS:
        if name in vars(source):
            setattr(target, name, getattr(source, name))
