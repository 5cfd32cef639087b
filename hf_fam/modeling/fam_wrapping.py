"""How a FAM model wraps a loaded base model: finding its decoder slot, copying its head without touching it,
and running the head's own forward with a FAM backbone in the decoder's place (`modeling_fam`, `hf_fam.patch`).

This file ships with every converted checkpoint: it imports only torch and its siblings.
"""

from __future__ import annotations

import copy

from torch import nn

from .fam_adapters import DecoderAdapter
from .fam_forward import attach_fam
from .fam_loss import check_head_loss, check_loss_chunk, chunked_lm_loss, no_logits_index


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


def fam_lm_forward(head_forward, return_dict: bool | None = None, **kwargs):
    """Run a causal LM's own forward (`head_forward`) whose decoder is a FAMModel, and attach the final FAM.

    The one forward path of converted (FAMForCausalLM) and patched models: the head's forward computes
    logits, loss and soft-capping exactly as the family does; FAM runs inside its decoder call.
    `fam_loss_chunk=K` with labels: no logits are kept and the loss is summed K tokens at a time (`fam_loss`).
    `return_dict=False` (None: the head's config decides, as transformers does) gives the output's tuple, the
    final FAM and the cache in it.
    """
    if return_dict is None:
        return_dict = getattr(head_forward.__self__.config, "return_dict", True)
    kwargs["return_dict"] = True  # the FAM and the cache are attached to the output object, then it may become a tuple
    sink: dict = {}
    labels = kwargs.get("labels")
    with_labels = labels is not None or kwargs.get("shift_labels") is not None
    keep = kwargs.get("logits_to_keep", 0) if with_labels else 0  # without labels the forward is the plain one
    loss_chunk = check_loss_chunk(kwargs.pop("fam_loss_chunk", None), keep)
    if loss_chunk and with_labels:
        head = head_forward.__self__
        check_head_loss(head)
        ref = kwargs["input_ids"] if kwargs.get("input_ids") is not None else kwargs["inputs_embeds"]
        kwargs.update(labels=None, logits_to_keep=no_logits_index(ref.device))
        shift_labels = kwargs.pop("shift_labels", None)
        outputs = head_forward(fam_output=sink, **kwargs)
        loss = chunked_lm_loss(head, sink["last_hidden_state"], labels, loss_chunk,
                               kwargs.get("num_items_in_batch"), shift_labels)
        outputs = type(outputs)(loss=loss, **dict(outputs))  # loss first, as the family returns it
    else:
        outputs = head_forward(fam_output=sink, **kwargs)
    outputs = attach_fam(outputs, sink.get("fam_state"), sink.get("cache"))
    return outputs if return_dict else outputs.to_tuple()


# PEFT's classes for a module it wrapped: tuner layers (LoRA's and the others) and whole-module wrappers
# (`modules_to_save` copies, trainable tokens; AuxiliaryTrainingWrapper from PEFT 0.15), known by name so that
# this file imports nothing of PEFT's
PEFT_WRAPPER_CLASSES = ("BaseTunerLayer", "AuxiliaryTrainingWrapper", "ModulesToSaveWrapper")


def foreign_adapter_layers(model: nn.Module) -> list[str]:
    """The modules of `model` wrapped by PEFT (tuner layers such as LoRA's, `modules_to_save` copies) when the
    adapters are not the model's own (transformers' `add_adapter` / `load_adapter` on it, which its save writes
    alone): a PeftModel's inner model, or a base given adapters before it was patched or wrapped. Saved as they
    are, their weights go under names no model loads (`q_proj.base_layer.weight`, ...)."""
    if getattr(model, "_hf_peft_config_loaded", False):
        return []

    def wrapped(module: nn.Module) -> bool:
        return any(cls.__name__ in PEFT_WRAPPER_CLASSES and cls.__module__.startswith("peft.")
                   for cls in type(module).__mro__)

    return [name for name, module in model.named_modules() if wrapped(module)]
