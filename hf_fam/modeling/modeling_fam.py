"""The models a FAM checkpoint's auto_map names: `FAMModel` (the backbone), `FAMForCausalLM` and the classifier
heads (`HEADS`), running TransformerFAM (Hwang et al., arXiv 2404.09173) inside the base family's own modules.

A FAM model *is* its base model with one extra tensor, the initial memory `fam.fam_init` (F, D). `FAMModel` wraps
the base decoder stack and is what `model.model`, `model.base_model` and `model.get_decoder()` return, so every
client that calls the decoder runs FAM; each head (`FAMHeadModel`) runs the family's own head forward with it in
the decoder's place, as `hf_fam.patch` does on a loaded model. Weight names stay the base checkpoint's, so LoRA
targets resolve. Ships with every converted checkpoint: it imports only torch, transformers and its siblings.
"""

from __future__ import annotations

import copy

import torch
from torch import nn
from transformers import (
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoModelForTokenClassification,
    GenerationMixin,
    PreTrainedModel,
)
from transformers.utils import logging

from .configuration_fam import HEAD_AUTO_CLASSES, HEADS, LABEL_FIELDS, FAMConfig
from .fam_adapters import get_adapter

# Every remote-code file must be a direct relative import of this module (the `noqa` ones are imported for
# that alone): loading from a local folder, older transformers (5.4 to 5.8) copy only the auto_map module's
# own relative imports into its module cache (tests/test_compat.py checks it). (`from .x import y` form:
# transformers finds them with a regular expression that skips `from . import x`)
from .fam_block_attention import BlockAttention  # noqa: F401
from .fam_cache import FAMCache
from .fam_chain import FAMChain  # noqa: F401
from .fam_chain_grad import chain_with_recompute  # noqa: F401
from .fam_compat import CACHE_KWARG, copy_load_markers, register_attention
from .fam_compile import layer_call  # noqa: F401
from .fam_core import SHARED_BASE_FLAG, fam_attention_forward
from .fam_forward import fam_forward, select_fam_attention
from .fam_generation import FAMGenerationMixin
from .fam_graphs import graphs_usable  # noqa: F401
from .fam_loss import chunked_lm_loss  # noqa: F401
from .fam_packing import refuse_packed_inputs  # noqa: F401
from .fam_plan import FAMPlan  # noqa: F401
from .fam_pretrained import (
    ADAPTERS_LAST,
    FAMMemory,
    FAMPreTrainedModel,
    keep_attention_implementation,
    refuse_adapter_unlike_training,
)
from .fam_settings import FAMSettings  # noqa: F401
from .fam_split_attention import split_attention  # noqa: F401
from .fam_state import FAMLayerState  # noqa: F401
from .fam_wrapping import child_name, decoder_slot, detached_copy, fam_lm_forward

register_attention(fam_attention_forward)
logger = logging.get_logger(__name__)


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
        keep_attention_implementation(config, decoder, kept)
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
            refuse_adapter_unlike_training(self._fam_owner if self._fam_owner is not None else self)
        if self.training and torch.is_grad_enabled() and self.config.fam_update == "sink":
            # the zero-shot start never updates the memory, so training in it would never train the memory:
            # training means the paper's update (as `hf-fam finetune` sets), and the saved config says so
            logger.warning_once(
                "Training a FAM model in its zero-shot start (fam_update='sink'): switching to the paper's memory "
                "update (config.fam_update = 'paper'), which the saved model will use too."
            )
            self.config.fam_update = "paper"
        settings = self.fam_settings
        if kwargs.get("return_dict") is None and self._fam_owner is None:  # standing alone: its config decides
            kwargs["return_dict"] = getattr(self.config, "return_dict", True)
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


class FAMHeadModel(FAMPreTrainedModel):
    """A base model's task head run with a FAMModel in its decoder's place: the base class of FAMForCausalLM and
    FAMForSequenceClassification. The head (the base causal LM, or the base sequence classifier) is built by
    `base_auto_class` from `config.base_config`, or given loaded (`from_base_model`); its own forward runs."""

    base_auto_class = AutoModelForCausalLM  # builds the base model of this head from `config.base_config`
    head_module = "lm_head"  # the child module a base model of this kind has (a loaded base is checked for it)
    head_kind, peft_task_type = HEADS["AutoModelForCausalLM"][1:]  # for messages; PEFT's task type (configuration_fam)

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        cls.head_kind, cls.peft_task_type = HEADS[cls.base_auto_class.__name__][1:]

    @classmethod
    def wraps(cls, model: nn.Module) -> bool:
        """Whether `model` (plain, patched or FAM) has a head of this kind: its `head_module`, and a class named as
        transformers names the models its Auto class builds (`...ForCausalLM`, `...ForTokenClassification`)."""
        suffix = cls.base_auto_class.__name__.removeprefix("AutoModel")
        return isinstance(getattr(model, cls.head_module, None), nn.Module) and any(
            c.__name__.endswith(suffix) for c in type(model).__mro__)

    def __init__(self, config: FAMConfig, base_model: PreTrainedModel | None = None,
                 fam_module: FAMMemory | None = None):
        given = base_model is not None  # a loaded model, whose weights stay as they are
        kept = base_model.config._attn_implementation if given else None
        super().__init__(config)
        if base_model is None:
            base_model = self.base_auto_class.from_config(config.base_config)
        elif not self.wraps(base_model):
            raise TypeError(f"{type(self).__name__} wraps a {self.head_kind} (a model with `{self.head_module}`), got "
                            f"{type(base_model).__name__}: use the FAM class for its head, or load the checkpoint "
                            f"with {self.base_auto_class.__name__}")
        else:
            for module in base_model.modules():
                module._is_hf_initialized = True
        config.base_config = base_model.config  # one config object, shared with the base model
        keep_attention_implementation(config, base_model, kept)
        self.fam_adapter = get_adapter(base_model.config.model_type)
        self.fam_adapter.check_config(base_model.config)
        # the head: the base model with a FAMModel in its decoder's place. It is a copy with its own
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
    ) -> FAMHeadModel:
        """Wrap a loaded base model of this class's head (a causal LM; a sequence classifier for
        FAMForSequenceClassification, whose labels are kept). Its modules are shared, not copied; the base model
        stays usable: called itself, it runs its own attention exactly as before (its config then names the FAM
        attention, `fam_sdpa` or `fam_eager`, which passes its calls through). For the same reason its decoder
        layers, called on their own, run plain attention; those of a converted or patched model fail clearly.

        Args:
            base_model: a loaded `LlamaForCausalLM`, `MistralForCausalLM`, `GemmaForCausalLM`, ... (for
                FAMForSequenceClassification: `LlamaForSequenceClassification`, ...)
            block_size, memory_segments, fam_length: C, M, F.
            fam_layers: "all" or "global" (see FAMConfig).
            fam_init: optional (F, D) initial FAM; defaults to the model's initialisation of it.
            fam_update: "paper" (default) or "sink" (see FAMConfig).
        """
        if not isinstance(base_model, PreTrainedModel):
            fix = ADAPTERS_LAST if hasattr(base_model, "peft_config") else "."
            raise TypeError(f"{cls.__name__}.from_base_model expects a loaded transformers {cls.head_kind}, got "
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
        # the base's mode, as patching keeps it (a loaded model is in eval mode), on the modules made here only
        for module in (model, model.get_decoder(), model.fam):
            module.training = base_model.training
        return model

    def _fam_base(self) -> nn.Module:
        return self._fam_head

    def set_input_embeddings(self, value):
        self._fam_head.set_input_embeddings(value)

    def get_decoder(self):
        """The FAMModel backbone: calling it runs FAM."""
        return self.model

    def _head_forward(self, cache, **kwargs):
        """The head's own forward, with FAM in its decoder (`fam_lm_forward`)."""
        if cache is None:
            cache = kwargs.pop("past_key_values", None)
        head = self._fam_head
        head.training = self.training  # the head object is not registered, so .train() does not reach it
        original = getattr(type(head), "_fam_original_class", type(head))
        if kwargs.get("return_dict") is None:  # this model's config decides (the head's may be the base's)
            kwargs["return_dict"] = getattr(self.config, "return_dict", True)
        return fam_lm_forward(original.forward.__get__(head), **{CACHE_KWARG: cache}, **kwargs)


class FAMForCausalLM(FAMHeadModel, FAMGenerationMixin, GenerationMixin):
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

    def get_output_embeddings(self):
        return self._fam_head.get_output_embeddings()

    def set_output_embeddings(self, new_embeddings):
        self._fam_head.set_output_embeddings(new_embeddings)
        self.add_module(child_name(self._fam_head, new_embeddings), new_embeddings)

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
        return self._head_forward(
            cache,
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            inputs_embeds=inputs_embeds,
            labels=labels,
            use_cache=use_cache,
            logits_to_keep=logits_to_keep,
            fam_cuda_graphs=fam_cuda_graphs,
            **kwargs,
        )


class FAMClassifierModel(FAMHeadModel):
    """A base family's classification head (`score`) on a FAMModel backbone: the base class of
    FAMForSequenceClassification and FAMForTokenClassification. Its weights are a FAM causal LM's (`model.*`,
    `fam.fam_init`) plus `score`, so `AutoModelFor...Classification.from_pretrained(fam_checkpoint, num_labels=...)`
    starts one from a converted checkpoint, as from a plain causal LM. Labels (`id2label`, `problem_type`) are this
    model's config's; the padding token is read where the family reads it, and `config.pad_token_id = ...` sets it
    there."""

    head_module = "score"

    def __init__(self, config: FAMConfig, base_model: PreTrainedModel | None = None,
                 fam_module: FAMMemory | None = None):
        if base_model is None:  # the score layer is built for this config's labels
            for name in LABEL_FIELDS:
                setattr(config.base_config, name, copy.deepcopy(getattr(config, name)))
        super().__init__(config, base_model=base_model, fam_module=fam_module)
        self._fam_head.config = config  # the loss reads and sets the labels and problem type on this config

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: FAMCache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        fam_cuda_graphs: bool = True,
        **kwargs,
    ):
        """Same arguments and outputs as the base family's classification forward (logits and the loss its
        problem type gives), plus `fam_state`."""
        return self._head_forward(
            cache,
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            inputs_embeds=inputs_embeds,
            labels=labels,
            use_cache=use_cache,
            fam_cuda_graphs=fam_cuda_graphs,
            **kwargs,
        )


class FAMForSequenceClassification(FAMClassifierModel):
    """A sequence classifier (or reward model) with Feedback Attention Memory: the family's
    sequence-classification head (`LlamaForSequenceClassification`, ...), which scores the last token that is not
    padding, on a FAMModel backbone (see FAMClassifierModel).

    Example:
    ```python
    >>> from transformers import AutoModelForSequenceClassification
    >>> model = AutoModelForSequenceClassification.from_pretrained("llama-fam", num_labels=1, trust_remote_code=True)
    >>> model(input_ids).logits.shape  # one reward per sequence
    torch.Size([1, 1])
    ```
    """

    base_auto_class = AutoModelForSequenceClassification


class FAMForTokenClassification(FAMClassifierModel):
    """A token classifier (tagging, NER) with Feedback Attention Memory: the family's token-classification head
    (`LlamaForTokenClassification`, ...), which scores every token, on a FAMModel backbone (see
    FAMClassifierModel). Each token's scores read the memory of every block before its window.

    Example:
    ```python
    >>> from transformers import AutoModelForTokenClassification
    >>> model = AutoModelForTokenClassification.from_pretrained("llama-fam", num_labels=5, trust_remote_code=True)
    >>> model(input_ids).logits.shape  # five scores per token
    torch.Size([1, 20, 5])
    ```
    """

    base_auto_class = AutoModelForTokenClassification


# the FAM class of every head a checkpoint's auto_map names (configuration_fam.AUTO_MAP)
HEAD_MODELS = tuple(globals()[name] for name in HEAD_AUTO_CLASSES)


def fam_head_class(model: nn.Module, caller: str = "FAM") -> type[FAMHeadModel]:
    """The FAM class of a model's head: FAMForCausalLM for a causal LM (plain, patched or FAM), ...; a TypeError
    naming `caller` for a model without a head FAM has."""
    for cls in HEAD_MODELS:
        if cls.wraps(model):
            return cls
    kinds = ", ".join(f"a {cls.head_kind} (with `{cls.head_module}`)" for cls in HEAD_MODELS)
    raise TypeError(f"{caller} expects {kinds}; got {type(model).__name__}.")


FAMConfig.register_for_auto_class()
FAMModel.register_for_auto_class("AutoModel")
FAMForCausalLM.register_for_auto_class("AutoModelForCausalLM")
FAMForSequenceClassification.register_for_auto_class("AutoModelForSequenceClassification")
FAMForTokenClassification.register_for_auto_class("AutoModelForTokenClassification")

__all__ = [
    "FAMClassifierModel", "FAMForCausalLM", "FAMForSequenceClassification", "FAMForTokenClassification",
    "FAMHeadModel", "FAMMemory", "FAMModel", "FAMPreTrainedModel", "HEAD_MODELS", "fam_forward", "fam_head_class",
    "fam_lm_forward",
]
