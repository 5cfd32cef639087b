"""One FAM forward through a base decoder stack: the arguments checked, the cache continued or started, the
run laid out (`FAMRun`), the decoder run with FAM attention, and the final FAM and cache put on the output.

`fam_forward` is the body of `FAMModel.forward` (modeling_fam.py), the one entry into FAM. This file ships with
every converted checkpoint: it imports only torch, transformers and its siblings.
"""

from __future__ import annotations

import contextlib
import dataclasses

import torch
from torch import nn

from .fam_adapters import DecoderAdapter
from .fam_cache import FAMCache, check_positions
from .fam_compat import (
    CACHE_KWARG,
    FAM_ATTENTION_PREFIX,
    SUPPORTED_INNER_ATTENTION,
    autocast_without_cache,
    checkpointing_call,
    inside_fam_forward,
    refuse_repacked_4bit_layers,
    set_output_cache,
    settle_unstated_reentrancy,
    uses_checkpointing,
    uses_reentrant_checkpointing,
)
from .fam_core import FAMRun
from .fam_packing import refuse_packed_inputs
from .fam_settings import FAMSettings

_OUTPUT_CLASSES: dict[type, type] = {}

NO_ATTENTION_WEIGHTS = (
    "FAM models do not return attention weights (output_attentions=True): a FAM layer attends over its memory and "
    "the last blocks, which no (tokens x tokens) matrix holds. Call without output_attentions (output_hidden_states "
    "works)."
)


def with_fam_state(outputs, fam_state):
    """`outputs` as an instance of a subclass of its class that declares `fam_state` as a field.

    Model outputs are dataclasses; DistributedDataParallel flattens them and rebuilds them from their
    declared fields, so an extra key must be a declared field to survive.
    """
    cls = type(outputs)
    if not dataclasses.is_dataclass(outputs) or any(f.name == "fam_state" for f in dataclasses.fields(outputs)):
        outputs["fam_state"] = fam_state
        return outputs
    if cls not in _OUTPUT_CLASSES:
        namespace = {"__annotations__": {"fam_state": "list | None"}, "fam_state": None, "__module__": cls.__module__,
                     "__qualname__": f"FAM{cls.__name__}",
                     "__doc__": f"{cls.__name__} with the final FAM of every layer."}
        _OUTPUT_CLASSES[cls] = dataclasses.dataclass(type(f"FAM{cls.__name__}", (cls,), namespace))
    return _OUTPUT_CLASSES[cls](**dict(outputs.items()), fam_state=fam_state)


def attach_fam(outputs, fam_state, cache):
    """`outputs` with the cache in its cache field (`.cache` on every supported release; outputs without one, a
    token classifier's, get none) and then the final FAM, so that its tuple form is the family's fields followed by
    `fam_state`. Either may be None (not attached)."""
    if cache is not None and dataclasses.is_dataclass(outputs) and CACHE_KWARG not in {
            f.name for f in dataclasses.fields(outputs)}:
        cache = None  # the FAMCache given to the forward is updated in place all the same
    if cache is not None:
        set_output_cache(outputs, cache)
    if fam_state is not None:
        outputs = with_fam_state(outputs, fam_state)
        if cache is not None:
            set_output_cache(outputs, cache)  # a new object: `.cache` again where the field is past_key_values
    return outputs


def select_fam_attention(base_config) -> str:
    """Route the base config's attention through FAM; return the inner implementation FAM uses.

    `set_attn_implementation("eager")` and friends reset the name, so this runs on every forward.
    """
    impl = base_config._attn_implementation or "sdpa"
    inner = impl[len(FAM_ATTENTION_PREFIX):] if impl.startswith(FAM_ATTENTION_PREFIX) else impl
    if inner not in SUPPORTED_INNER_ATTENTION:
        raise ValueError(
            "FAM runs its block attention with attn_implementation "
            f"{' or '.join(map(repr, SUPPORTED_INNER_ATTENTION))}; "
            f"got {impl!r}. Load the model with attn_implementation='sdpa' (or 'eager')."
        )
    if impl != FAM_ATTENTION_PREFIX + inner:
        base_config._attn_implementation = FAM_ATTENTION_PREFIX + inner
    return inner


def fam_forward(
    *,
    base_forward,
    base_model: nn.Module,
    adapter: DecoderAdapter,
    settings: FAMSettings,
    fam_module: nn.Module,
    input_ids: torch.LongTensor | None = None,
    attention_mask: torch.Tensor | None = None,
    position_ids: torch.LongTensor | None = None,
    cache: FAMCache | None = None,
    inputs_embeds: torch.Tensor | None = None,
    use_cache: bool | None = None,
    fam_cuda_graphs: bool = True,
    **kwargs,
):
    """Run a base decoder stack's forward with FAM: the body of `FAMModel.forward`, the one entry into FAM.

    `fam_cuda_graphs` (default True): on CUDA without autograd, replay the FAM chain's update steps from
    CUDA graphs (one launch per step instead of dozens; same kernels, same result); False runs the chain
    eagerly. Besides the base model's arguments it takes (in `kwargs`):
        fam_state: list of per-layer initial FAM tensors (B or 1, F, D) for a fresh sequence, instead
            of forward-propagating `fam_init` (Random State Passing, see hf_fam.training).
        fam_position_offset: (B,) integer offsets added to all positions (Random Position Offset).
        fam_output: a dict that receives `fam_state`, the cache and `last_hidden_state` too (how
            `fam_lm_forward` passes them past the head).
    The output gains `fam_state`: the final FAM of every layer, (B, F, D) each (F > 0 only).
    """
    sink = kwargs.pop("fam_output", None)
    return_dict = kwargs.pop("return_dict", None)
    refuse_packed_inputs(position_ids, attention_mask, **kwargs)  # several documents in one row
    if kwargs.get("output_attentions", getattr(base_model.config, "output_attentions", False)):
        # transformers would collect the weights FAM's attention never returns: an empty tuple, silently
        raise ValueError(NO_ATTENTION_WEIGHTS)
    if (input_ids is None) == (inputs_embeds is None):
        raise ValueError("Pass exactly one of input_ids or inputs_embeds.")
    if input_ids is not None and input_ids.dim() != 2:
        raise ValueError(f"input_ids must be 2D (batch, sequence), got shape {tuple(input_ids.shape)}.")
    ref = input_ids if input_ids is not None else inputs_embeds
    batch, n = ref.shape[0], ref.shape[1]
    if n == 0 or batch == 0:
        raise ValueError(f"Empty input (shape {tuple(ref.shape)}): FAM needs at least one token per batch.")

    config = base_model.config
    if return_dict is None:
        return_dict = getattr(config, "return_dict", True)
    decoder = adapter.decoder(base_model)
    inner = select_fam_attention(config)
    if use_cache is None:
        # a training forward never reuses its cache: do not build one unless asked
        use_cache = getattr(config, "use_cache", False) and not decoder.training
    checkpointed = decoder.training and torch.is_grad_enabled() and uses_checkpointing(decoder)
    if checkpointed:
        settle_unstated_reentrancy(decoder)  # PEFT's QLoRA recipe states none
    if checkpointed and uses_reentrant_checkpointing(decoder):
        raise ValueError(
            "FAM needs non-reentrant gradient checkpointing (the FAM chain reaches into every layer): call "
            f"{checkpointing_call()}."
        )
    if checkpointed:
        use_cache = False
    if decoder.training and torch.is_grad_enabled():
        refuse_repacked_4bit_layers(decoder)

    if isinstance(cache, FAMCache) and cache.started and not use_cache:
        use_cache = True  # continuing a stream always updates its cache
    if cache is not None and not isinstance(cache, FAMCache):
        if cache.get_seq_length() > 0:
            raise ValueError(
                f"A FAM model continues only a FAMCache, got a non-empty {type(cache).__name__}. "
                "Pass the cache a previous FAM forward returned, or none (keys and values made elsewhere, such as "
                "PEFT prefix tuning's, have no FAM memory to continue: use LoRA)."
            )
        cache = None  # an empty cache of another type (e.g. made by generate) is replaced
    if cache is None and use_cache:
        cache = FAMCache(settings)
    if cache is not None:
        cache.check_compatible(settings, batch, base_model)

    chunk_mask = _chunk_mask(attention_mask, batch, n, ref.device, cache)
    if cache is not None:
        cache.check_continuation(attention_mask, chunk_mask, position_ids)
    elif position_ids is not None:
        check_positions(position_ids, chunk_mask, None)

    states = cache.layer_states if cache is not None and cache.started else None
    fam_state = kwargs.pop("fam_state", None)
    position_offset = kwargs.pop("fam_position_offset", None)
    if fam_state is not None and states is not None:
        raise ValueError("fam_state starts a new sequence; it cannot be combined with a started FAMCache.")
    fam_init = None
    if states is None and fam_state is None and settings.fam_length > 0:
        fam_init = fam_module(batch, adapter.embed_scale(decoder))
        # the memory enters as the tokens' embeddings do: TRL keeps a QLoRA adapter's trained weights, fam_init
        # among them, in bf16 while the layers compute in the model's dtype
        embeds_dtype = ref.dtype if inputs_embeds is not None else base_model.get_input_embeddings().weight.dtype
        fam_init = fam_init.to(embeds_dtype)
    # a checkpointed training forward under autocast runs without its cast cache (see autocast_without_cache)
    with autocast_without_cache(ref.device.type) if checkpointed else contextlib.nullcontext():
        run = FAMRun.start(
            settings=settings,
            adapter=adapter,
            decoder=decoder,
            inner=inner,
            chunk_mask=chunk_mask,
            fam_init=fam_init,
            states=states,
            keep_state=bool(use_cache),
            fam_state=fam_state,
            position_offset=position_offset,
            cuda_graphs=fam_cuda_graphs,
        )
        with inside_fam_forward():  # transformers builds no (N x N) mask in here
            outputs = base_forward(
                input_ids=input_ids,
                attention_mask=None,  # padding reaches FAM through the run
                position_ids=run.plan.position_ids,
                inputs_embeds=inputs_embeds,
                use_cache=False,
                fam_run=run,
                return_dict=True,  # the FAM and the cache go on the output object; a tuple is made at the end
                **{CACHE_KWARG: None},
                **kwargs,
            )
    if sink is not None:
        sink["last_hidden_state"] = outputs.last_hidden_state  # fam_loss_chunk's loss reads it
    if use_cache:
        cache.advance(run.states, chunk_mask, position_ids)
    # the final FAM of every layer (Random State Passing starts the next sequence from it)
    final_fam = run.final_fam if settings.fam_length > 0 else None
    outputs = attach_fam(outputs, final_fam, cache if use_cache else None)
    if sink is not None:
        sink.update(fam_state=final_fam, cache=cache if use_cache else None)
    return outputs if return_dict else outputs.to_tuple()


def _chunk_mask(attention_mask, batch: int, n: int, device, cache: FAMCache | None) -> torch.Tensor:
    """(B, n) bool: which of this chunk's tokens are real. `attention_mask` may cover past tokens too."""
    if attention_mask is None:
        return torch.ones(batch, n, dtype=torch.bool, device=device)
    if not isinstance(attention_mask, torch.Tensor) or attention_mask.dim() != 2:
        shape = (tuple(attention_mask.shape) if isinstance(attention_mask, torch.Tensor)
                 else type(attention_mask).__name__)
        raise ValueError(
            f"FAM takes a 2D padding attention_mask (batch, tokens) of 0/1; got {shape}. "
            "Custom 4D masks are not supported: FAM builds its own block masks."
        )
    past = cache.total_columns if cache is not None else 0
    if attention_mask.shape[0] != batch or attention_mask.shape[1] not in (n, past + n):
        expected = f"({batch}, {n})" if past == 0 else f"({batch}, {n}) or ({batch}, {past + n})"
        raise ValueError(
            f"attention_mask has shape {tuple(attention_mask.shape)}, expected {expected} "
            f"for input of shape ({batch}, {n})."
        )
    return attention_mask[:, -n:].to(device=device, dtype=torch.bool)
