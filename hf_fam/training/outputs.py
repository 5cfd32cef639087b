"""Model outputs that survive DistributedDataParallel: `fam_state` declared as a field.

A FAM forward adds `fam_state` to the base model's output object (`CausalLMOutputWithPast`), which has no such
field. DDP flattens a module's output into a pytree and rebuilds it with `type(output)(**fields)`, so it fails
with "CausalLMOutputWithPast.__init__() got an unexpected keyword argument 'fam_state'" (seen with torch 2.13,
transformers 5.24). Until the model returns an output class that declares the field, training code converts the
outputs: `with_fam_state_field(outputs)` returns an instance of a subclass that does. The training recipe's hook
does it for every forward of the model it is attached to, and `declare_fam_state(model)` does only that.
"""

from __future__ import annotations

import dataclasses

from torch import nn

_SUBCLASSES: dict[type, type] = {}


def _subclass_with_fam_state(cls: type) -> type:
    if cls not in _SUBCLASSES:
        namespace = {"__annotations__": {"fam_state": "list | None"}, "fam_state": None, "__module__": __name__,
                     "__qualname__": f"FAM{cls.__name__}", "__doc__": f"{cls.__name__} with the final FAM per layer."}
        _SUBCLASSES[cls] = dataclasses.dataclass(type(f"FAM{cls.__name__}", (cls,), namespace))
    return _SUBCLASSES[cls]


def with_fam_state_field(outputs):
    """The same outputs as an instance of a class that declares `fam_state` (unchanged when it already does).

    Args:
        outputs: a transformers `ModelOutput` from a FAM forward (anything else is returned as is).

    Returns:
        A `FAM<OutputClass>` holding the same values, or `outputs` itself.
    """
    if not dataclasses.is_dataclass(outputs) or not hasattr(outputs, "keys") or "fam_state" not in outputs:
        return outputs
    if any(f.name == "fam_state" for f in dataclasses.fields(outputs)):
        return outputs
    return _subclass_with_fam_state(type(outputs))(**dict(outputs.items()))


def declare_fam_state(model: nn.Module):
    """Make every forward of `model` return outputs that declare `fam_state` (needed under DDP).

    Args:
        model: the module DDP wraps (a FAM model or its PeftModel).

    Returns:
        The hook handle (`.remove()` undoes it).

    Example:
    ```python
    >>> declare_fam_state(peft_model)
    >>> ddp_model = accelerator.prepare(peft_model)
    ```
    """
    return model.register_forward_hook(lambda module, args, outputs: with_fam_state_field(outputs))


__all__ = ["declare_fam_state", "with_fam_state_field"]
