"""FAMModel and FAMForCausalLM: Hugging Face models running TransformerFAM (Hwang et al., arXiv 2404.09173).

A FAM model *is* its base model (Llama, Mistral, Gemma, ...) with one extra tensor, the learned initial
memory `fam.fam_init` (F, D). FAM lives in the backbone: `FAMModel` wraps the base decoder stack and is
what `model.model`, `model.base_model` and `model.get_decoder()` return, so every client that calls the
decoder runs FAM. `FAMForCausalLM` runs the base model's own causal-LM forward (logits, loss,
soft-capping) with a FAMModel in its decoder's place; `hf_fam.patch` puts a FAMModel in a loaded model's
decoder place the same way. The modules keep their usual names, so a converted checkpoint's weight names
equal the base checkpoint's and LoRA targets resolve. The base decoder's own forward runs every step;
`fam_forward` (fam_forward.py) only prepares the FAM run and selects the FAM attention function (see `fam_core`).

This file ships with every converted checkpoint: it imports only torch, transformers and its siblings.
"""

from __future__ import annotations

import copy
import importlib

import torch
from torch import nn
from transformers import AutoModel, AutoModelForCausalLM, GenerationMixin, PreTrainedModel
from transformers.utils import logging

from .configuration_fam import AUTO_MAP, FAMConfig
from .fam_adapters import get_adapter

# Every remote-code file must be a direct relative import of this module (the `noqa` ones are imported for
# that alone): loading from a local folder, older transformers (5.5, for one) copy only the auto_map module's
# own relative imports into their module cache. (`from .x import y` form: transformers finds them with a
# regular expression that skips `from . import x`)
from .fam_block_attention import BlockAttention  # noqa: F401
from .fam_cache import FAMCache
from .fam_chain import FAMChain  # noqa: F401
from .fam_chain_grad import chain_with_recompute  # noqa: F401
from .fam_compat import (
    CACHE_KWARG,
    copy_load_markers,
    needs_eager_attention,
    register_attention,
)
from .fam_compile import layer_call  # noqa: F401
from .fam_core import SHARED_BASE_FLAG, fam_attention_forward
from .fam_forward import fam_forward, select_fam_attention
from .fam_generation import FAMGenerationMixin
from .fam_graphs import graphs_usable  # noqa: F401
from .fam_loss import chunked_lm_loss  # noqa: F401
from .fam_packing import refuse_packed_inputs  # noqa: F401
from .fam_plan import FAMPlan  # noqa: F401
from .fam_settings import FAMSettings, adapter_bases_unlike_training
from .fam_split_attention import split_attention  # noqa: F401
from .fam_state import FAMLayerState  # noqa: F401
from .fam_wrapping import child_name, decoder_slot, detached_copy, fam_lm_forward, foreign_adapter_layers

register_attention(fam_attention_forward)
logger = logging.get_logger(__name__)


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

    @property
    def fam_settings(self) -> FAMSettings:
        """C, M, F and fam_layers of this model (one FAMSettings value, from its config)."""
        return FAMSettings.of(self.config)

    def save_pretrained(self, save_directory, *args, **kwargs):
        """Save as usual; config.json maps every FAM class (`AutoModel` and `AutoModelForCausalLM`), so the
        checkpoint loads either way with `trust_remote_code=True`. Refuses a model holding PEFT adapters that
        are not its own (`fam_wrapping.foreign_adapter_layers`): their weights would be saved under names no model
        loads, and the checkpoint would load with those layers newly initialised."""
        wrapped = foreign_adapter_layers(self)
        if wrapped:
            raise ValueError(
                f"{len(wrapped)} modules of this model are wrapped by PEFT adapters (first: {wrapped[0]}), so a "
                "checkpoint would store their weights under names no model loads: save the model before adding "
                "the adapter, merge it in first (PEFT's merge_and_unload), or save the adapter alone (the "
                "PeftModel's save_pretrained)"
            )
        self.config.auto_map = dict(AUTO_MAP)
        return super().save_pretrained(save_directory, *args, **kwargs)

    def push_to_hub(self, repo_id: str, **kwargs):
        """transformers' `push_to_hub`; where hf_fam is installed, `hf_fam.checkpoint_io.publish.push_to_hub`: the
        checkpoint is checked before anything is uploaded and goes with its FAM model card. As remote code (no
        hf_fam), transformers' own, with its generic card."""
        if type(self).__module__.startswith("hf_fam."):  # not as remote code, which must import no hf_fam
            return importlib.import_module("hf_fam.checkpoint_io.publish").push_to_hub(self, repo_id, **kwargs)
        return super().push_to_hub(repo_id, **kwargs)

    def _fam_base(self) -> nn.Module:
        """The base module this model wraps (its decoder, or its causal LM): the owner of every weight but
        `fam_init`."""
        raise NotImplementedError

    def _init_weights(self, module):
        """`fam_init` is drawn like any new weight; every other module is initialised by the base model's rule."""
        if isinstance(module, FAMMemory):
            nn.init.normal_(module.fam_init, mean=0.0, std=getattr(self.config.base_config, "initializer_range", 0.02))
        elif module is not self:
            self._fam_base()._init_weights(module)

    def get_input_embeddings(self):
        return self._fam_base().get_input_embeddings()

    def __setattr__(self, name: str, value) -> None:
        """A child module replaced on this model is replaced in the module it wraps too, whose own forward runs on
        its own attributes: PEFT puts its wrappers in place so (`modules_to_save` of the final `norm`, `lm_head` or
        `embed_tokens`, LoRA on `lm_head`), and unwrapped on this model alone they would never run."""
        super().__setattr__(name, value)
        if isinstance(value, nn.Module):
            base = self.__dict__.get("_fam_decoder", self.__dict__.get("_fam_head"))
            if base is not None and base._modules.get(name, value) is not value:
                setattr(base, name, value)

    def _adopt(self, base: nn.Module, skip: tuple[str, ...] = ()) -> None:
        """Make `base`'s child modules ours under the same names (weight names stay the checkpoint's),
        and take over what transformers reads from its class (tied weights, split rules, ...)."""
        for name, child in base.named_children():
            if name not in skip:
                self.add_module(name, child)
        for attr in ("_tied_weights_keys", "_no_split_modules", "_keep_in_fp32_modules", "_skip_keys_device_placement"):
            value = getattr(type(base), attr, None)
            if value is not None:
                setattr(self, attr, value)


def _keep_attention_implementation(config: FAMConfig, module: nn.Module | None, kept: str | None) -> None:
    """PreTrainedModel.__init__ resets the nested config's attention implementation: keep the one a given
    module already runs with, else pick eager where the family cannot run sdpa (e.g. Gemma 2)."""
    if kept is not None:
        config.base_config._attn_implementation = kept
    elif module is not None and needs_eager_attention(module) and config.base_config._attn_implementation == "sdpa":
        config.base_config._attn_implementation = "eager"


def _refuse_adapter_unlike_training(owner) -> None:
    """A PEFT adapter in training whose named base would not run what training runs, once loaded on it: a base
    in the zero-shot start (no memory update) or a plain checkpoint (no FAM): a silent wrong result. Checked once
    per set of adapters."""
    adapters = tuple(sorted(getattr(owner, "peft_config", None) or {}))
    if not adapters or getattr(owner, "_fam_checked_adapters", None) == adapters:
        return
    found = adapter_bases_unlike_training(owner)
    if found:
        name, base, kind = found[0]
        why = ("whose config.json runs the zero-shot start (fam_update='sink'): training uses the paper's memory "
               "update, which the adapter loaded on that base would run without" if kind == "zero-shot" else
               "which is not a FAM checkpoint: the adapter loaded on that base would run without FAM")
        raise ValueError(
            f"training the adapter {name!r} of {base}, {why}. Save the base for training first, before wrapping it: "
            "hf_fam.training.save_training_base(model, DIR) (or train with hf-fam finetune, which does)"
        )
    object.__setattr__(owner, "_fam_checked_adapters", adapters)


# the fix for a PeftModel given where a base model is expected
_ADAPTERS_LAST = ": give FAM the base model, then add the adapters to the FAM model (get_peft_model(fam_model, ...))"


class FAMModel(FAMPreTrainedModel):
    """The FAM backbone: a base decoder stack (`LlamaModel`, `GemmaModel`, ...) running Feedback Attention
    Memory. Every client that reaches a FAM model's decoder (`model.model`, `model.base_model`,
    `model.get_decoder()`, TRL's fused-head path) runs FAM through this forward.

    Its modules are the decoder's, under the decoder's names (`embed_tokens`, `layers`, `norm`, ...); the
    learned initial memory is `fam` here when the backbone stands alone (`AutoModel`), or the causal LM's
    `fam` when it is one's decoder (so a converted checkpoint keeps the key `fam.fam_init`).

    Returns the decoder's output (`last_hidden_state`, the `FAMCache` when `use_cache`, hidden states on
    request) plus `fam_state`: the final FAM of every layer.

    Example:
    ```python
    >>> from transformers import AutoModel
    >>> backbone = AutoModel.from_pretrained("llama-fam", trust_remote_code=True)
    >>> backbone(input_ids).last_hidden_state.shape
    torch.Size([1, 20, 64])
    ```
    """

    def __init__(self, config: FAMConfig, decoder: nn.Module | None = None, fam_module: FAMMemory | None = None,
                 *, fam_owner: nn.Module | None = None, keep_weights: bool = False):
        """`decoder`: the base decoder stack to run (built from `config.base_config` when None).
        `fam_owner`: the causal LM whose `fam` module holds the initial memory (None: this model holds it).
        `keep_weights`: the decoder's weights are loaded ones, never to be re-initialised."""
        kept = decoder.config._attn_implementation if decoder is not None else None
        super().__init__(config)
        if decoder is None:
            decoder = AutoModel.from_config(config.base_config)
        elif keep_weights:
            for module in decoder.modules():
                module._is_hf_initialized = True
        config.base_config = decoder.config  # one config object, shared with the decoder's modules
        _keep_attention_implementation(config, decoder, kept)
        self.fam_adapter = get_adapter(decoder.config.model_type)
        self.fam_adapter.check_config(decoder.config)
        self._adopt(decoder)
        # the decoder object itself stays unregistered: its forward runs, with FAM, on our modules
        object.__setattr__(self, "_fam_decoder", decoder)
        object.__setattr__(self, "_fam_owner", fam_owner)
        if fam_owner is None:
            if fam_module is None:
                dtype = next(decoder.parameters()).dtype
                fam_module = FAMMemory(config.fam_length, decoder.config.hidden_size, dtype=dtype)
            self.fam = fam_module
        select_fam_attention(decoder.config)  # a layer called on its own fails clearly, never skips FAM
        self.post_init()

    @property
    def fam_memory(self) -> nn.Module:
        """The module holding `fam_init` (read at every forward: PEFT may have wrapped it since)."""
        return self._fam_owner.fam if self._fam_owner is not None else self.fam

    def _fam_base(self) -> nn.Module:
        return self._fam_decoder

    def set_input_embeddings(self, value):
        self._fam_decoder.set_input_embeddings(value)
        self.add_module(child_name(self._fam_decoder, value), value)

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: FAMCache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        use_cache: bool | None = None,
        fam_cuda_graphs: bool = True,
        **kwargs,
    ):
        """Same arguments and outputs as the base decoder's forward; `cache` is a FAMCache. See
        `fam_forward` for the FAM arguments (`fam_state`, `fam_position_offset`, `fam_cuda_graphs`)."""
        if cache is None:
            cache = kwargs.pop("past_key_values", None)
        decoder = self._fam_decoder
        decoder.training = self.training  # the decoder object is not registered, so .train() does not reach it
        if self.training and torch.is_grad_enabled():
            _refuse_adapter_unlike_training(self._fam_owner if self._fam_owner is not None else self)
        if self.training and torch.is_grad_enabled() and self.config.fam_update == "sink":
            # the zero-shot start never updates the memory, so training in it would never train the memory:
            # training means the paper's update (as `hf-fam finetune` sets), and the saved config says so
            logger.warning_once(
                "Training a FAM model in its zero-shot start (fam_update='sink'): switching to the paper's memory "
                "update (config.fam_update = 'paper'), which the saved model will use too."
            )
            self.config.fam_update = "paper"
        settings = self.fam_settings
        return fam_forward(
            base_forward=type(decoder).forward.__get__(decoder),
            base_model=decoder,
            adapter=self.fam_adapter,
            settings=settings,
            fam_module=self.fam_memory,
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            fam_cuda_graphs=fam_cuda_graphs,
            **kwargs,
        )


class FAMForCausalLM(FAMPreTrainedModel, FAMGenerationMixin, GenerationMixin):
    """A causal LM with Feedback Attention Memory: a FAMModel backbone and the base model's head.

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

    def __init__(self, config: FAMConfig, base_model: PreTrainedModel | None = None,
                 fam_module: FAMMemory | None = None):
        given = base_model is not None  # a loaded model, whose weights stay as they are
        kept = base_model.config._attn_implementation if given else None
        super().__init__(config)
        if base_model is None:
            base_model = AutoModelForCausalLM.from_config(config.base_config)
        else:
            for module in base_model.modules():
                module._is_hf_initialized = True
        config.base_config = base_model.config  # one config object, shared with the base model
        _keep_attention_implementation(config, base_model, kept)
        self.fam_adapter = get_adapter(base_model.config.model_type)
        self.fam_adapter.check_config(base_model.config)
        # the head: the base causal LM with a FAMModel in its decoder's place. It is a copy with its own
        # child table, so a base model given by the caller keeps its own decoder and stays usable.
        name, decoder = decoder_slot(base_model, self.fam_adapter)
        head = detached_copy(base_model)
        setattr(head, name, FAMModel(config, decoder=decoder, fam_owner=self, keep_weights=given))
        self._adopt(head, skip=("fam",))
        object.__setattr__(self, "_fam_head", head)
        if fam_module is None:
            dtype = next(base_model.parameters()).dtype
            fam_module = FAMMemory(config.fam_length, base_model.config.hidden_size, dtype=dtype)
        self.fam = fam_module
        self.post_init()
        if given:  # a base loaded quantized or spread over devices: clients ask this model
            copy_load_markers(base_model, self)

    @classmethod
    def from_base_model(
        cls, base_model: PreTrainedModel, *, block_size: int, memory_segments: int, fam_length: int,
        fam_layers: str = "all", fam_init: torch.Tensor | None = None, fam_update: str = "paper",
    ) -> FAMForCausalLM:
        """Wrap a loaded base causal LM. Its modules are shared, not copied; the base model stays usable:
        called itself, it runs its own attention exactly as before (its config then names the FAM attention,
        `fam_sdpa` or `fam_eager`, which passes its calls through). For the same reason its decoder layers,
        called on their own, run plain attention; those of a converted or patched model fail clearly.

        Args:
            base_model: a loaded `LlamaForCausalLM`, `MistralForCausalLM`, `GemmaForCausalLM`, ...
            block_size, memory_segments, fam_length: C, M, F.
            fam_layers: "all" or "global" (see FAMConfig).
            fam_init: optional (F, D) initial FAM; defaults to the model's initialisation of it.
            fam_update: "paper" (default) or "sink" (see FAMConfig).
        """
        if not isinstance(base_model, PreTrainedModel):
            fix = _ADAPTERS_LAST if hasattr(base_model, "peft_config") else "."
            raise TypeError(f"FAMForCausalLM.from_base_model expects a loaded transformers causal LM, got "
                            f"{type(base_model).__name__}{fix}")
        config = FAMConfig(base_config=base_model.config, block_size=block_size,
                           memory_segments=memory_segments, fam_length=fam_length, fam_layers=fam_layers,
                           fam_update=fam_update)
        fam = getattr(base_model, "fam", None)
        if not isinstance(fam, FAMMemory):
            fam = FAMMemory(fam_length, base_model.config.hidden_size, dtype=next(base_model.parameters()).dtype)
            fam.to(next(base_model.parameters()).device)
            fam.fam_init.data.normal_(0.0, getattr(base_model.config, "initializer_range", 0.02))
        model = cls(config, base_model=base_model, fam_module=fam)
        for module in base_model.modules():
            setattr(module, SHARED_BASE_FLAG, True)
        if fam_init is not None:
            with torch.no_grad():
                model.fam.fam_init.copy_(fam_init)
        if getattr(base_model, "generation_config", None) is not None:  # the checkpoint's decoding defaults
            model.generation_config = copy.deepcopy(base_model.generation_config)
        return model

    # --- weights -------------------------------------------------------------------------------------
    def _fam_base(self) -> nn.Module:
        return self._fam_head

    def set_input_embeddings(self, value):
        self._fam_head.set_input_embeddings(value)

    def get_output_embeddings(self):
        return self._fam_head.get_output_embeddings()

    def set_output_embeddings(self, new_embeddings):
        self._fam_head.set_output_embeddings(new_embeddings)
        self.add_module(child_name(self._fam_head, new_embeddings), new_embeddings)

    def get_decoder(self):
        """The FAMModel backbone: calling it runs FAM."""
        return self.model

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
        head = self._fam_head
        head.training = self.training  # the head object is not registered, so .train() does not reach it
        original = getattr(type(head), "_fam_original_class", type(head))
        return fam_lm_forward(
            original.forward.__get__(head),
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            inputs_embeds=inputs_embeds,
            labels=labels,
            use_cache=use_cache,
            logits_to_keep=logits_to_keep,
            fam_cuda_graphs=fam_cuda_graphs,
            **{CACHE_KWARG: cache},
            **kwargs,
        )


FAMConfig.register_for_auto_class()
FAMModel.register_for_auto_class("AutoModel")
FAMForCausalLM.register_for_auto_class("AutoModelForCausalLM")

__all__ = ["FAMForCausalLM", "FAMMemory", "FAMModel", "FAMPreTrainedModel", "fam_forward", "fam_lm_forward"]
