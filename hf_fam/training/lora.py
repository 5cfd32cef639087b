"""LoRA for FAM models through PEFT: which modules to adapt, and the learned memory that travels with the adapter.

The paper (§3.1) turns pretrained models into FAM models with LoRA of rank 64 on the attention and MLP
projections; the only new weight of a FAM model, the initial memory `fam.fam_init` (F, D), is trained in full.
PEFT needs two things it cannot find on its own for `model_type="fam"`:

- `target_modules`: PEFT looks its defaults up by `model_type`, and "fam" is unknown to it. The projection names
  of each family come from its adapter (`fam_adapters.get_adapter(model_type).lora_target_modules`).
- `modules_to_save=["fam"]`: the module holding `fam_init` is then trained and saved with the adapter, so an
  adapter folder carries the learned memory. (A learned tensor must sit in its own module for this to work.)
  The decoder layers' normalization layers are added there too by default (`train_norms`): measured on
  SmolLM2-135M, LoRA on the projections alone leaves the memory unable to carry a passkey one block, and trained
  norms let it learn.

`fam_lora_config(model)` returns a `peft.LoraConfig` with both filled in and with every requested target name
checked against the model: PEFT silently skips target names that match nothing as long as one name matches.

A LoRA start that changes the base weights (PiSSA: A and B from each weight's top singular vectors, the residual
left in the base) would give an adapter that only applies to those changed weights. `save_lora_start` before
training and `save_adapter` after it save PEFT's conversion instead: a plain LoRA adapter of twice the rank that
applies to the unchanged base (W + B'A' = W_res + BA).
"""

from __future__ import annotations

import re
from pathlib import Path

from peft import LoraConfig
from torch import nn

from ..modeling.fam_adapters import get_adapter
from ..modeling.modeling_fam import fam_head_class
from .options import DEFAULT_LORA_RANK

# LoraOptions.init -> LoraConfig.init_lora_weights. "pissa_niter_4": PiSSA from a randomized SVD of 4 subspace
# iterations, which PEFT recommends over the full SVD for large weights (the memory probe of docs/training.md ran it)
# (keys: options.LORA_INITS)
PEFT_LORA_INITS = {"peft": True, "pissa": "pissa_niter_4"}
# PEFT's starts that move the base weights, which save_adapter converts back (PEFT's own list of prefixes)
_BASE_CHANGING_INITS = ("pissa", "corda", "olora", "lora_ga")

FAM_MODULE_NAME = "fam"
# where PEFT's ModulesToSaveWrapper keeps the module it wraps and its trained copies
_PEFT_WRAPPER_PARTS = ("original_module", "modules_to_save")


def unwrap_fam_model(model: nn.Module) -> nn.Module:
    """The FAM model inside DDP / accelerate / PEFT wrappers: a FAMForCausalLM or a patched model.

    Args:
        model: a FAM model, possibly wrapped (`DistributedDataParallel`, `PeftModel`, ...).

    Returns:
        The innermost module that carries `fam_settings` and the `fam` memory module.

    Example:
    ```python
    >>> peft_model = get_peft_model(fam_model, fam_lora_config(fam_model))
    >>> unwrap_fam_model(peft_model) is fam_model
    True
    ```
    """
    seen = model
    for _ in range(8):  # wrappers nest a few levels at most
        # PeftModel forwards attribute lookups to the model inside: unwrap before asking for FAM attributes
        base = model.get_base_model() if callable(getattr(model, "get_base_model", None)) else None
        inner = getattr(model, "module", None)
        if isinstance(base, nn.Module) and base is not model:  # PeftModel
            model = base
        elif isinstance(inner, nn.Module) and inner is not model:  # DistributedDataParallel, accelerate wrappers
            model = inner
        else:
            break
    if hasattr(model, "fam_settings") and isinstance(getattr(model, FAM_MODULE_NAME, None), nn.Module):
        return model
    raise ValueError(
        f"expected a FAM model (FAMForCausalLM, or a model patched with hf_fam.patch), got {type(seen).__name__}; "
        "wrap it first with hf_fam.FAMForCausalLM.from_base_model(model, ...) or hf_fam.patch(model, ...)."
    )


def base_model_type(model: nn.Module) -> str:
    """The decoder family of a FAM model ("llama", "mistral", "gemma", ...), wrappers allowed."""
    config = unwrap_fam_model(model).config
    base = getattr(config, "base_config", None)
    return (base if base is not None else config).model_type


def check_lora_targets(model: nn.Module, target_modules: list[str] | tuple[str, ...] | str) -> None:
    """Raise a ValueError naming every requested target that matches no module, and the names that exist.

    Matching follows PEFT: a name matches a module whose full name equals it or ends with ".name"; a single
    string is a regular expression matched against full module names.

    Args:
        model: the (FAM) model LoRA will be applied to.
        target_modules: names as given to `LoraConfig(target_modules=...)`.
    """
    names = [name for name, _ in unwrap_fam_model(model).named_modules() if name]
    linear = sorted({name.rsplit(".", 1)[-1] for name, mod in unwrap_fam_model(model).named_modules()
                     if isinstance(mod, nn.Linear)})
    if isinstance(target_modules, str):
        if not any(re.fullmatch(target_modules, name) for name in names):
            raise ValueError(
                f"LoRA target pattern {target_modules!r} matches no module of this {base_model_type(model)} model; "
                f"its linear layers are named {', '.join(linear)}. Pass some of those names."
            )
        return
    missing = [t for t in target_modules if not any(n == t or n.endswith("." + t) for n in names)]
    if missing:
        raise ValueError(
            f"LoRA target module{'s' if len(missing) > 1 else ''} {', '.join(map(repr, missing))} not found in this "
            f"{base_model_type(model)} model; its linear layers are named {', '.join(linear)}. "
            "Pass names from that list (hf-fam finetune --lora-targets q_proj,v_proj)."
        )


def norm_module_names(model: nn.Module, in_layers: bool = False) -> list[str]:
    """The names (last part, as PEFT's `modules_to_save` takes them) of the model's normalization layers: the
    modules whose class is a LayerNorm or whose class name ends in "Norm" (`LlamaRMSNorm`, `GemmaRMSNorm`, the
    q/k norms of Qwen 3 and Gemma 3, ...), in the order they first appear. A norm PEFT already wraps (in a
    model given to `get_peft_model` before) counts under the wrapper's name. `in_layers`: only those inside the
    decoder layers (not the final norm)."""
    names: dict[str, None] = {}
    for full_name, module in model.named_modules():
        if in_layers and ".layers." not in f".{full_name}.":
            continue
        if full_name and (isinstance(module, nn.LayerNorm) or type(module).__name__.endswith("Norm")):
            parts = full_name.split(".")
            wrapped = next((i for i, part in enumerate(parts) if part in _PEFT_WRAPPER_PARTS), len(parts))
            names.setdefault(parts[wrapped - 1])
    return list(names)


def fam_lora_config(
    model: nn.Module,
    *,
    r: int = DEFAULT_LORA_RANK,
    lora_alpha: int | None = None,
    lora_dropout: float = 0.0,
    target_modules: list[str] | tuple[str, ...] | str | None = None,
    train_fam_init: bool = True,
    train_norms: bool = True,
    **lora_kwargs,
) -> LoraConfig:
    """A `peft.LoraConfig` for a FAM model: its family's attention and MLP projections, and `fam_init` and the
    normalization layers trained in full.

    Args:
        model: a FAMForCausalLM, a FAM classifier (FAMForSequenceClassification, FAMForTokenClassification) or a
            patched model (wrappers allowed).
        r: LoRA rank (paper: 64).
        lora_alpha: LoRA alpha; defaults to `r` (scaling 1; the paper does not state it).
        lora_dropout: dropout on the LoRA branch.
        target_modules: module names to adapt; defaults to the family's q/k/v/o and gate/up/down projections.
            Every name must match a module of the model (ValueError otherwise).
        train_fam_init: train and save the learned initial memory with the adapter (`modules_to_save=["fam"]`).
        train_norms: also train and save the weights of the decoder layers' normalization layers
            (`norm_module_names(model, in_layers=True)`; a few hundredths of a percent of the weights). A
            pretrained model's memory does not learn to carry content with LoRA on the projections alone
            (docs/training.md, "Where training starts the memory"). The final norm is left out: every measurement
            of this recipe trained the layers' norms alone, and adding the final norm learnt the passkey probe
            slower (answer loss 1.542 against 1.359 after 50 steps, SmolLM2-135M); name it in `modules_to_save`
            to train it.
        lora_kwargs: any other `LoraConfig` field (`bias`, `use_rslora`, ...).

    Returns:
        A LoraConfig with `task_type="CAUSAL_LM"`, so that `AutoPeftModelForCausalLM` reloads the adapter
        (`"SEQ_CLS"` for a sequence classifier, `"TOKEN_CLS"` for a token classifier, patched or not: PEFT then
        trains and saves its `score` layer too).

    Example:
    ```python
    >>> from peft import get_peft_model
    >>> fam = hf_fam.FAMForCausalLM.from_base_model(base, block_size=1024, memory_segments=3, fam_length=64)
    >>> peft_model = get_peft_model(fam, fam_lora_config(fam, r=64))
    >>> peft_model.save_pretrained("adapter")   # LoRA weights + fam.fam_init
    ```
    """
    fam_model = unwrap_fam_model(model)
    if isinstance(r, bool) or not isinstance(r, int) or r < 1:
        raise ValueError(f"LoRA rank r must be a positive integer, got {r!r}")
    if target_modules is None:
        target_modules = list(get_adapter(base_model_type(fam_model)).lora_target_modules)
    elif not isinstance(target_modules, str):
        target_modules = list(target_modules)
        if not target_modules:
            raise ValueError("target_modules is empty: name at least one module (e.g. q_proj, v_proj).")
    check_lora_targets(fam_model, target_modules)
    modules_to_save = list(lora_kwargs.pop("modules_to_save", None) or [])
    if train_fam_init and fam_model.fam_settings.fam_length > 0 and FAM_MODULE_NAME not in modules_to_save:
        modules_to_save.append(FAM_MODULE_NAME)
    if train_norms:
        modules_to_save += [name for name in norm_module_names(fam_model, in_layers=True)
                            if name not in modules_to_save]
    lora_kwargs.setdefault("task_type", fam_head_class(fam_model, "fam_lora_config").peft_task_type)
    return LoraConfig(
        r=r,
        lora_alpha=r if lora_alpha is None else lora_alpha,
        lora_dropout=lora_dropout,
        target_modules=target_modules,
        modules_to_save=modules_to_save or None,
        **lora_kwargs,
    )


def changes_base_weights(peft_model, adapter_name: str = "default") -> bool:
    """Whether the adapter's start (PiSSA, OLoRA, CorDA, LoRA-GA) moved part of the base weights into LoRA."""
    init = peft_model.peft_config[adapter_name].init_lora_weights
    return isinstance(init, str) and init.lower().startswith(_BASE_CHANGING_INITS)


def save_lora_start(peft_model, folder: str | Path) -> None:
    """Save the adapter as it starts, before training, for `save_adapter`'s conversion. PEFT's recipe: the start is
    saved marked as a plain LoRA start (`init_lora_weights=True`), so that loading it does not decompose the
    residual weights a second time. The live config is left as it was."""
    if "." in Path(folder).name:
        raise ValueError(f"{Path(folder).name!r}: PEFT loads the start as an adapter named after its folder, and "
                         "adapter names cannot hold a dot; choose a folder name without one.")
    config = peft_model.peft_config["default"]
    init = config.init_lora_weights
    config.init_lora_weights = True
    try:
        peft_model.save_pretrained(str(folder))
    finally:
        config.init_lora_weights = init


def save_adapter(peft_model, folder: str | Path, lora_start: str | Path | None = None) -> None:
    """`peft_model.save_pretrained(folder)`, or, given the start `save_lora_start` saved, the adapter converted to
    one that applies to the base weights as they were before `get_peft_model` (rank and alpha doubled: the trained
    factors beside the start's, negated). The live model and its config are left as they were.

    PEFT's conversion (`path_initial_model_for_weight_conversion`, PEFT 0.21) writes the LoRA factors only: the
    trained `modules_to_save` (fam_init, the norms) are put back into the saved file here."""
    if lora_start is None:
        peft_model.save_pretrained(str(folder))
        return
    from peft import get_peft_model_state_dict
    from peft.utils.constants import SAFETENSORS_WEIGHTS_NAME
    from safetensors.torch import load_file, save_file

    config = peft_model.peft_config["default"]
    # PEFT rewrites these on the live config while it converts
    kept = {name: getattr(config, name) for name in ("r", "lora_alpha", "init_lora_weights", "rank_pattern",
                                                      "alpha_pattern")}
    try:
        peft_model.save_pretrained(str(folder), path_initial_model_for_weight_conversion=str(Path(lora_start)))
    finally:
        for name, value in kept.items():
            setattr(config, name, value)
    weights_file = Path(folder) / SAFETENSORS_WEIGHTS_NAME
    converted = load_file(weights_file)
    trained = get_peft_model_state_dict(peft_model)
    dropped = {name: tensor for name, tensor in trained.items() if name not in converted and "lora_" not in name}
    if dropped:
        whole = {**converted, **{name: t.detach().cpu().contiguous() for name, t in dropped.items()}}
        save_file(whole, weights_file, metadata={"format": "pt"})


__all__ = ["DEFAULT_LORA_RANK", "PEFT_LORA_INITS", "base_model_type", "changes_base_weights", "check_lora_targets",
           "fam_lora_config", "norm_module_names", "save_adapter", "save_lora_start", "unwrap_fam_model"]
