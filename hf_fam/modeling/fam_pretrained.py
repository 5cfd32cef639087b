"""The parts every FAM model class shares: `FAMMemory` (the learned initial memory, `fam.fam_init`),
`FAMPreTrainedModel` (saving, weight initialisation, child modules shared with the wrapped base model) and the
checks run when a FAM model is built or trained. The model classes themselves are in `modeling_fam`.

This file ships with every converted checkpoint: it imports only torch, transformers and its siblings.
"""

from __future__ import annotations

import importlib

import torch
from torch import nn
from transformers import PreTrainedModel

from .configuration_fam import AUTO_MAP, FAMConfig
from .fam_compat import load_adapter_checked, needs_eager_attention
from .fam_settings import FAMSettings, adapter_bases_unlike_training
from .fam_wrapping import foreign_adapter_layers


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
        """Save as usual; config.json maps every FAM class (`AUTO_MAP`: the backbone, the causal LM, the sequence
        classifier), so the checkpoint loads any of these ways with `trust_remote_code=True`. Refuses a model
        holding PEFT adapters that are not its own (`fam_wrapping.foreign_adapter_layers`): their weights would be
        saved under names no model loads, and the checkpoint would load with those layers newly initialised."""
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

    def load_adapter(self, *args, **kwargs):
        """transformers' `load_adapter` (also what `from_pretrained(ADAPTER)` calls), refused in one line where
        the installed transformers would leave out the adapter's modules_to_save (`fam_compat`)."""
        return load_adapter_checked(self, super().load_adapter, *args, **kwargs)

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


def keep_attention_implementation(config: FAMConfig, module: nn.Module | None, kept: str | None) -> None:
    """PreTrainedModel.__init__ resets the nested config's attention implementation: keep the one a given
    module already runs with, else pick eager where the family cannot run sdpa (e.g. Gemma 2)."""
    if kept is not None:
        config.base_config._attn_implementation = kept
    elif module is not None and needs_eager_attention(module) and config.base_config._attn_implementation == "sdpa":
        config.base_config._attn_implementation = "eager"


def refuse_adapter_unlike_training(owner) -> None:
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
ADAPTERS_LAST = ": give FAM the base model, then add the adapters to the FAM model (get_peft_model(fam_model, ...))"
