"""`patch(model, ...)`: turn an already-loaded causal LM (Llama, Mistral, Gemma, ...), sequence classifier or token
classifier into FAM mode, in place.

The model's decoder stack is put inside a `FAMModel` backbone in its place (`model.model` runs FAM, as in a
converted FAMForCausalLM: one forward path for both), the model's class gets a subclass swapped in that
attaches the final FAM to its outputs and saves FAM checkpoints, every submodule keeps its name and object,
and one small module is added: `model.fam`, holding the learned initial FAM. `save_pretrained` then writes a
FAM checkpoint that `AutoModelForCausalLM.from_pretrained` (`AutoModelFor...Classification` for a classifier;
or `trust_remote_code=True`) loads.
"""

from __future__ import annotations

import torch
from transformers import PreTrainedModel

from ..checkpoint_io.fam_init import bos_fam_init
from ..modeling.configuration_fam import FAMConfig
from ..modeling.fam_adapters import get_adapter
from ..modeling.fam_compat import CACHE_KWARG, FAM_ATTENTION_PREFIX, load_adapter_checked
from ..modeling.fam_generation import FAMGenerationMixin
from ..modeling.fam_settings import (
    DEFAULT_BLOCK_SIZE,
    DEFAULT_FAM_LAYERS,
    DEFAULT_FAM_LENGTH,
    DEFAULT_MEMORY_SEGMENTS,
    ZERO_SHOT_FAM_UPDATE,
    FAMSettings,
)
from ..modeling.fam_wrapping import decoder_slot, fam_lm_forward
from ..modeling.modeling_fam import FAMHeadModel, FAMMemory, FAMModel, fam_head_class

_PATCHED_CLASSES: dict[type, type] = {}


class FAMPatchedMixin(FAMGenerationMixin):
    """Mixed in front of the model's own class by `patch`."""

    _fam_original_class: type
    _fam_decoder_name: str

    @property
    def fam_settings(self) -> FAMSettings:
        return getattr(self, self._fam_decoder_name).fam_settings

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, cache=None, inputs_embeds=None,
                use_cache=None, fam_cuda_graphs=True, **kwargs):
        """The model's own forward (its decoder is a FAMModel), with `fam_state` attached to the output."""
        if cache is None:
            cache = kwargs.pop("past_key_values", None)
        return fam_lm_forward(
            super().forward,
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            fam_cuda_graphs=fam_cuda_graphs,
            **{CACHE_KWARG: cache},
            **kwargs,
        )

    def to_fam_model(self) -> FAMHeadModel:
        """A FAMForCausalLM (FAMForSequenceClassification, FAMForTokenClassification for a classifier) sharing this
        model's modules (nothing is copied)."""
        s = self.fam_settings
        return fam_head_class(self).from_base_model(
            self, block_size=s.block_size, memory_segments=s.memory_segments, fam_length=s.fam_length,
            fam_layers=s.fam_layers, fam_update=s.fam_update,
        )

    def load_adapter(self, *args, **kwargs):
        """transformers' `load_adapter`, refused in one line where it would leave out the adapter's modules_to_save
        (`fam_compat.load_adapter_checked`)."""
        return load_adapter_checked(self, super().load_adapter, *args, **kwargs)

    def save_pretrained(self, save_directory, *args, **kwargs):
        """Write a FAM checkpoint (FAMConfig, base weights under their names, `fam.fam_init`, remote code)."""
        return self.to_fam_model().save_pretrained(save_directory, *args, **kwargs)

    def push_to_hub(self, repo_id: str, **kwargs):
        """Push the FAM checkpoint `save_pretrained` writes, checked, with its FAM model card
        (`hf_fam.checkpoint_io.publish.push_to_hub`)."""
        from ..checkpoint_io.publish import push_to_hub

        return push_to_hub(self, repo_id, **kwargs)


def _patched_class(cls: type) -> type:
    if cls not in _PATCHED_CLASSES:
        _PATCHED_CLASSES[cls] = type(
            f"FAM{cls.__name__}", (FAMPatchedMixin, cls), {"_fam_original_class": cls, "__module__": cls.__module__}
        )
    return _PATCHED_CLASSES[cls]


def patch(
    model: PreTrainedModel,
    *,
    block_size: int = DEFAULT_BLOCK_SIZE,
    memory_segments: int = DEFAULT_MEMORY_SEGMENTS,
    fam_length: int = DEFAULT_FAM_LENGTH,
    fam_layers: str = DEFAULT_FAM_LAYERS,
    fam_init: torch.Tensor | str | None = None,
    fam_update: str = ZERO_SHOT_FAM_UPDATE,
) -> PreTrainedModel:
    """Put a loaded causal LM (or sequence classifier) into FAM mode, in place, and return it.

    Args:
        model: a `LlamaForCausalLM`, `MistralForCausalLM` or `GemmaForCausalLM` (see
            `hf_fam.supported_model_types()`), or the family's sequence classifier (`LlamaForSequenceClassification`,
            ...: a reward model), which then scores each row's last token with FAM, or its token classifier
            (`LlamaForTokenClassification`, ...), which scores every token with FAM.
        block_size: C, tokens per block.
        memory_segments: M, previous blocks each block attends to.
        fam_length: F, FAM tokens per layer (0 = block sliding window attention).
        fam_layers: "all" (default) or "global": only the checkpoint's full-attention layers carry FAM,
            its sliding-window layers run block sliding window attention (Gemma 2/3, Qwen 2).
        fam_init: the initial FAM at the embedding level: an (F, D) tensor, "bos" (default: the BOS token's
            embedding in every slot, see `hf_fam.checkpoint_io.fam_init`) or "random" (normal, std `initializer_range`).
            A model patched before keeps its `fam` unless a value is given.
        fam_update: "sink" (default, the zero-shot start: the memory is not updated and block tokens read its
            first slot as an attention sink) or "paper" (the paper's update after every block, for training
            and for a trained fam_init). See `FAMConfig`.

    Returns:
        The same object, now running FAM, in the mode it was in (a loaded model: eval). `hf_fam.unpatch(model)`
        undoes it.

    Example:
    ```python
    >>> model = AutoModelForCausalLM.from_pretrained("meta-llama/Llama-3.2-1B")
    >>> hf_fam.patch(model, block_size=1024, memory_segments=3, fam_length=64)
    >>> model.generate(**inputs)
    ```
    """
    if not isinstance(model, PreTrainedModel) or not hasattr(model, "config"):
        fix = (": patch the base model, then add the adapters (get_peft_model(model, ...))"
               if hasattr(model, "peft_config") else ".")
        raise TypeError(f"hf_fam.patch expects a loaded transformers causal LM, got {type(model).__name__}{fix}")
    model_type = getattr(model.config, "model_type", None)
    adapter = get_adapter(model_type)  # ValueError naming model_type and the supported families
    adapter.check_config(model.config)
    settings = FAMSettings(block_size, memory_segments, fam_length, fam_layers, fam_update)
    fam_head_class(model, "hf_fam.patch")  # a causal LM or a classifier, else TypeError
    try:
        name, decoder = decoder_slot(model, adapter)
    except TypeError:
        raise TypeError(f"hf_fam.patch expects a causal LM with a decoder stack, got {type(model).__name__}.") from None

    hidden = model.config.hidden_size
    param = next(model.parameters())
    fam = getattr(model, "fam", None)
    if not isinstance(fam, FAMMemory) or tuple(fam.fam_init.shape) != (fam_length, hidden):
        fam = FAMMemory(fam_length, hidden, dtype=param.dtype).to(param.device)
        fam_init = "bos" if fam_init is None else fam_init
    if isinstance(fam_init, str):
        if fam_init == "random":
            torch.nn.init.normal_(fam.fam_init, std=getattr(model.config, "initializer_range", 0.02))
            fam_init = None
        elif fam_init == "bos":
            fam_init = bos_fam_init(model, fam_length)
        else:
            raise ValueError(f"fam_init must be a tensor, 'bos' or 'random', got {fam_init!r}")
    if fam_init is not None:
        if tuple(fam_init.shape) != (fam_length, hidden):
            raise ValueError(f"fam_init must have shape ({fam_length}, {hidden}), got {tuple(fam_init.shape)}.")
        with torch.no_grad():
            fam.fam_init.copy_(fam_init)
    model.fam = fam
    config = FAMConfig(base_config=model.config, **settings.as_kwargs())
    backbone = FAMModel(config, decoder=decoder, fam_owner=model, keep_weights=True)
    # the new modules take the model's mode (loaded models are in eval mode): a FAMModel left in training mode
    # would run a zero-shot model's forward with gradients as training (the paper's update, no cache)
    backbone.training = fam.training = decoder.training
    setattr(model, name, backbone)
    original = getattr(type(model), "_fam_original_class", type(model))
    model.__class__ = _patched_class(original)
    model._fam_decoder_name = name
    return model


def unpatch(model: PreTrainedModel) -> PreTrainedModel:
    """Undo `patch`: the model runs its own decoder and attention again (its `fam` module is removed)."""
    original = getattr(type(model), "_fam_original_class", None)
    if original is None:
        raise ValueError(f"{type(model).__name__} is not patched by hf_fam.")
    name = model._fam_decoder_name
    setattr(model, name, getattr(model, name)._fam_decoder)
    model.__class__ = original
    del model.fam
    del model._fam_decoder_name
    impl = model.config._attn_implementation
    if impl and impl.startswith(FAM_ATTENTION_PREFIX):
        model.config._attn_implementation = impl[len(FAM_ATTENTION_PREFIX):]
    return model
