"""FAMForCausalLM: a Hugging Face causal LM running TransformerFAM (Hwang et al., arXiv 2404.09173).

A FAM model *is* its base model (Llama, Mistral, Gemma, ...) with one extra tensor, the learned initial
memory `fam.fam_init` (F, D). The base model's modules are children of FAMForCausalLM under their usual
names, so a converted checkpoint's weight names equal the base checkpoint's and LoRA targets resolve.
The base model's own forward runs every step; `fam_forward` only prepares the FAM run and selects the FAM
attention function (see `fam_core`).

This file ships with every converted checkpoint: it imports only torch, transformers and its siblings.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn
from transformers import AutoModelForCausalLM, GenerationMixin, PreTrainedModel

from .configuration_fam import FAMConfig
from .fam_adapters import DecoderAdapter, get_adapter
from .fam_cache import FAMCache, check_positions
from .fam_compat import (
    CACHE_KWARG,
    FAM_ATTENTION_PREFIX,
    SUPPORTED_INNER_ATTENTION,
    register_attention,
    uses_reentrant_checkpointing,
)
from .fam_core import FAMRun, fam_attention_forward
from .fam_settings import FAMSettings

register_attention(fam_attention_forward)


_OUTPUT_CLASSES: dict[type, type] = {}


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
                     "__qualname__": f"FAM{cls.__name__}", "__doc__": f"{cls.__name__} with the final FAM of every layer."}
        _OUTPUT_CLASSES[cls] = dataclasses.dataclass(type(f"FAM{cls.__name__}", (cls,), namespace))
    return _OUTPUT_CLASSES[cls](**dict(outputs.items()), fam_state=fam_state)


class FAMMemory(nn.Module):
    """Holds the learned initial FAM, `fam_init` (F, D), at the token-embedding level.

    Kept in its own small module so that PEFT's `modules_to_save=["fam"]` can train and save it.
    """

    def __init__(self, fam_length: int, hidden_size: int, dtype: torch.dtype | None = None):
        super().__init__()
        self.fam_init = nn.Parameter(torch.zeros(fam_length, hidden_size, dtype=dtype))

    def forward(self, batch_size: int, embed_scale: torch.Tensor | float = 1.0) -> torch.Tensor:
        """F_0^0 for a batch: (B, F, D), scaled as the architecture scales token embeddings."""
        fam = self.fam_init * embed_scale
        return fam[None].expand(batch_size, -1, -1)

    def extra_repr(self) -> str:
        return f"fam_length={self.fam_init.shape[0]}, hidden_size={self.fam_init.shape[1]}"


def fam_settings_of(config) -> FAMSettings:
    return FAMSettings(config.block_size, config.memory_segments, config.fam_length,
                       getattr(config, "fam_layers", "all"), getattr(config, "fam_update", "paper"))


def select_fam_attention(base_config) -> str:
    """Route the base config's attention through FAM; return the inner implementation FAM uses.

    `set_attn_implementation("eager")` and friends reset the name, so this runs on every forward.
    """
    impl = base_config._attn_implementation or "sdpa"
    inner = impl[len(FAM_ATTENTION_PREFIX):] if impl.startswith(FAM_ATTENTION_PREFIX) else impl
    if inner not in SUPPORTED_INNER_ATTENTION:
        raise ValueError(
            f"FAM runs its block attention with attn_implementation {' or '.join(map(repr, SUPPORTED_INNER_ATTENTION))}; "
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
    """Run the base causal LM's forward with FAM. Shared by FAMForCausalLM and patched models.

    `fam_cuda_graphs` (default True): on CUDA without autograd, replay the FAM chain's update steps from
    CUDA graphs (one launch per step instead of dozens; same kernels, same result); False runs the chain
    eagerly. Besides the base model's arguments it takes (in `kwargs`):
        fam_state: list of per-layer initial FAM tensors (B or 1, F, D) for a fresh sequence, instead
            of forward-propagating `fam_init` (Random State Passing, see hf_fam.training).
        fam_position_offset: (B,) integer offsets added to all positions (Random Position Offset).
    The output gains `fam_state`: the final FAM of every layer, (B, F, D) each (F > 0 only).
    """
    if (input_ids is None) == (inputs_embeds is None):
        raise ValueError("Pass exactly one of input_ids or inputs_embeds.")
    if input_ids is not None and input_ids.dim() != 2:
        raise ValueError(f"input_ids must be 2D (batch, sequence), got shape {tuple(input_ids.shape)}.")
    ref = input_ids if input_ids is not None else inputs_embeds
    batch, n = ref.shape[0], ref.shape[1]
    if n == 0 or batch == 0:
        raise ValueError(f"Empty input (shape {tuple(ref.shape)}): FAM needs at least one token per batch.")

    config = base_model.config
    decoder = adapter.decoder(base_model)
    inner = select_fam_attention(config)
    if use_cache is None:
        # a training forward never reuses its cache: do not build one unless asked
        use_cache = getattr(config, "use_cache", False) and not decoder.training
    if decoder.training and torch.is_grad_enabled() and uses_reentrant_checkpointing(decoder):
        raise ValueError(
            "FAM needs non-reentrant gradient checkpointing (the FAM chain reaches into every layer): call "
            "model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={'use_reentrant': False})."
        )
    if getattr(decoder, "gradient_checkpointing", False) and decoder.training and torch.is_grad_enabled():
        use_cache = False

    if isinstance(cache, FAMCache) and cache.started and not use_cache:
        use_cache = True  # continuing a stream always updates its cache
    if cache is not None and not isinstance(cache, FAMCache):
        if cache.get_seq_length() > 0:
            raise ValueError(
                f"A FAM model continues only a FAMCache, got a non-empty {type(cache).__name__}. "
                "Pass the cache a previous FAM forward returned, or none."
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
    outputs = base_forward(
        input_ids=input_ids,
        attention_mask=None,  # padding reaches FAM through the run; no (N x N) mask is built
        position_ids=run.position_ids,
        inputs_embeds=inputs_embeds,
        use_cache=False,
        fam_run=run,
        **{CACHE_KWARG: None},
        **kwargs,
    )
    if settings.fam_length > 0:
        # the final FAM of every layer (Random State Passing starts the next sequence from it)
        outputs = with_fam_state(outputs, run.final_fam)
    if use_cache:
        cache.advance(run.states, chunk_mask, position_ids)
        outputs[CACHE_KWARG] = cache
    return outputs


def _chunk_mask(attention_mask, batch: int, n: int, device, cache: FAMCache | None) -> torch.Tensor:
    """(B, n) bool: which of this chunk's tokens are real. `attention_mask` may cover past tokens too."""
    if attention_mask is None:
        return torch.ones(batch, n, dtype=torch.bool, device=device)
    if not isinstance(attention_mask, torch.Tensor) or attention_mask.dim() != 2:
        shape = tuple(attention_mask.shape) if isinstance(attention_mask, torch.Tensor) else type(attention_mask).__name__
        raise ValueError(
            f"FAM takes a 2D padding attention_mask (batch, tokens) of 0/1; got {shape}. "
            "Custom 4D masks are not supported: FAM builds its own block masks."
        )
    past = cache.total_columns if cache is not None else 0
    if attention_mask.shape[0] != batch or attention_mask.shape[1] not in (n, past + n):
        expected = f"({batch}, {n})" if past == 0 else f"({batch}, {n}) or ({batch}, {past + n})"
        raise ValueError(
            f"attention_mask has shape {tuple(attention_mask.shape)}, expected {expected} for input of shape ({batch}, {n})."
        )
    return attention_mask[:, -n:].to(device=device, dtype=torch.bool)


class FAMPreTrainedModel(PreTrainedModel):
    config_class = FAMConfig
    config: FAMConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _supports_sdpa = True
    _supports_flash_attn = False
    _supports_flex_attn = False
    _supports_attention_backend = False
    _can_compile_fullgraph = False


class FAMForCausalLM(FAMPreTrainedModel, GenerationMixin):
    """A causal LM with Feedback Attention Memory.

    Build it from a FAMConfig (random weights, like any `from_config`), load a converted checkpoint with
    `AutoModelForCausalLM.from_pretrained(path)` (or `trust_remote_code=True` without hf_fam installed),
    or wrap a loaded base model with `FAMForCausalLM.from_base_model(model, block_size=..., ...)`.

    Example:
    ```python
    >>> from transformers import LlamaConfig, LlamaForCausalLM
    >>> from hf_fam import FAMForCausalLM
    >>> base = LlamaForCausalLM(LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
    ...                                     num_attention_heads=4, num_key_value_heads=2, vocab_size=100))
    >>> model = FAMForCausalLM.from_base_model(base, block_size=8, memory_segments=1, fam_length=4)
    >>> model(torch.randint(0, 100, (1, 20))).logits.shape
    torch.Size([1, 20, 100])
    ```
    """

    def __init__(self, config: FAMConfig, base_model: PreTrainedModel | None = None, fam_module: FAMMemory | None = None):
        # PreTrainedModel.__init__ sets the attention implementation on the nested config too: keep the
        # one a given base model already runs with
        kept_impl = base_model.config._attn_implementation if base_model is not None else None
        super().__init__(config)
        if base_model is None:
            base_model = AutoModelForCausalLM.from_config(config.base_config)
        config.base_config = base_model.config  # one config object, shared with the base model
        if kept_impl is not None:
            base_model.config._attn_implementation = kept_impl
        elif not getattr(type(base_model), "_supports_sdpa", True) and base_model.config._attn_implementation == "sdpa":
            base_model.config._attn_implementation = "eager"  # e.g. Gemma 2: soft-capping needs eager
        self.fam_adapter = get_adapter(base_model.config.model_type)
        self.fam_adapter.check_config(base_model.config)
        # the base model's modules become ours under the same names; the base object itself is kept
        # unregistered, to run its forward (and so its head: logits, loss, soft-capping) unchanged
        for name, child in base_model.named_children():
            if name != "fam":
                self.add_module(name, child)
        object.__setattr__(self, "_fam_base", base_model)
        # a model patched in place (hf_fam.patch) runs FAM in its own forward: call its original one
        original = getattr(type(base_model), "_fam_original_class", type(base_model))
        object.__setattr__(self, "_fam_base_forward", original.forward.__get__(base_model))
        for attr in ("_tied_weights_keys", "_no_split_modules", "_keep_in_fp32_modules", "_skip_keys_device_placement"):
            value = getattr(type(base_model), attr, None)
            if value is not None:
                setattr(self, attr, value)
        if fam_module is None:
            dtype = next(base_model.parameters()).dtype
            fam_module = FAMMemory(config.fam_length, base_model.config.hidden_size, dtype=dtype)
        else:
            for module in base_model.modules():
                module._is_hf_initialized = True
        self.fam = fam_module
        self.post_init()

    @classmethod
    def from_base_model(
        cls, base_model: PreTrainedModel, *, block_size: int, memory_segments: int, fam_length: int,
        fam_layers: str = "all", fam_init: torch.Tensor | None = None, fam_update: str = "paper",
    ) -> FAMForCausalLM:
        """Wrap a loaded base causal LM (its modules are shared, not copied).

        Args:
            base_model: a loaded `LlamaForCausalLM`, `MistralForCausalLM`, `GemmaForCausalLM`, ...
            block_size, memory_segments, fam_length: C, M, F.
            fam_layers: "all" or "global" (see FAMConfig).
            fam_init: optional (F, D) initial FAM; defaults to the model's initialisation of it.
            fam_update: "paper" (default) or "sink" (see FAMConfig).
        """
        config = FAMConfig(base_config=base_model.config, block_size=block_size,
                           memory_segments=memory_segments, fam_length=fam_length, fam_layers=fam_layers,
                           fam_update=fam_update)
        fam = getattr(base_model, "fam", None)
        if not isinstance(fam, FAMMemory):
            fam = FAMMemory(fam_length, base_model.config.hidden_size, dtype=next(base_model.parameters()).dtype)
            fam.to(next(base_model.parameters()).device)
            fam.fam_init.data.normal_(0.0, getattr(base_model.config, "initializer_range", 0.02))
        model = cls(config, base_model=base_model, fam_module=fam)
        if fam_init is not None:
            with torch.no_grad():
                model.fam.fam_init.copy_(fam_init)
        return model

    # --- weights -------------------------------------------------------------------------------------
    def _init_weights(self, module):
        if isinstance(module, FAMMemory):
            nn.init.normal_(module.fam_init, mean=0.0, std=getattr(self.config.base_config, "initializer_range", 0.02))
        elif module is not self:
            self._fam_base._init_weights(module)

    def get_input_embeddings(self):
        return self._fam_base.get_input_embeddings()

    def set_input_embeddings(self, value):
        self._fam_base.set_input_embeddings(value)

    def get_output_embeddings(self):
        return self._fam_base.get_output_embeddings()

    def set_output_embeddings(self, new_embeddings):
        self._fam_base.set_output_embeddings(new_embeddings)

    def get_decoder(self):
        return self.fam_adapter.decoder(self._fam_base)

    @property
    def fam_settings(self) -> FAMSettings:
        return fam_settings_of(self.config)

    # --- forward -------------------------------------------------------------------------------------
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: FAMCache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        fam_cuda_graphs: bool = True,
        **kwargs,
    ):
        """Same arguments and outputs as the base model's causal LM forward; `cache` is a FAMCache.
        `fam_cuda_graphs=False` runs the FAM chain eagerly on CUDA (see `fam_forward`)."""
        if cache is None:
            cache = kwargs.pop("past_key_values", None)
        base = self._fam_base
        base.training = self.training  # the base object is not registered, so .train() does not reach it
        return fam_forward(
            base_forward=self._fam_base_forward,
            base_model=base,
            adapter=self.fam_adapter,
            settings=self.fam_settings,
            fam_module=self.fam,
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            labels=labels,
            logits_to_keep=logits_to_keep,
            fam_cuda_graphs=fam_cuda_graphs,
            **kwargs,
        )


FAMConfig.register_for_auto_class()
FAMForCausalLM.register_for_auto_class("AutoModelForCausalLM")

__all__ = ["FAMForCausalLM", "FAMMemory", "FAMPreTrainedModel", "fam_forward"]
