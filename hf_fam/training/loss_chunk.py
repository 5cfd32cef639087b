"""`fam_loss_chunk` for training loops that call the model themselves: transformers' `Trainer`, accelerate, a plain
loop.

`model(..., labels=..., fam_loss_chunk=K)` sums the loss K tokens at a time and keeps no (tokens x vocabulary)
logits (hf_fam/modeling/fam_loss.py; docs/training.md, "Long sequences"). A `Trainer` builds the forward's
arguments from the batch, so there is no place to pass the keyword. `enable_loss_chunk(model, K)` adds it with
a forward pre-hook to every training-mode forward that has labels:

- evaluation (`model.eval()`, Trainer's `evaluate` and `predict`) keeps the full logits that metrics read;
- a call that passes `fam_loss_chunk` itself keeps its own value;
- TRL's `fused_lm_head=True` calls are left alone: TRL applies the head itself there.

The model must be a FAM model (or a wrapper of one): any other model would take the keyword into its `**kwargs`
and ignore it, silently computing full logits, so it is refused.
"""

from __future__ import annotations

from torch import nn
from torch.utils.hooks import RemovableHandle

from ..modeling.fam_loss import check_loss_chunk
from ..modeling.fam_settings import DEFAULT_LOSS_CHUNK_TOKENS
from .lora import unwrap_fam_model


def enable_loss_chunk(model: nn.Module, tokens: int = DEFAULT_LOSS_CHUNK_TOKENS) -> RemovableHandle:
    """Pass `fam_loss_chunk=tokens` to every training-mode forward of `model` that has labels.

    Args:
        model: a FAMForCausalLM, a patched model, or a PeftModel / DDP wrapper of one: the module the training
            loop calls. Attach once.
        tokens: tokens per logits computation (default `DEFAULT_LOSS_CHUNK_TOKENS`).

    Returns:
        The hook's handle: `.remove()` restores full logits.

    Example:
    ```python
    >>> handle = enable_loss_chunk(peft_model, 1024)
    >>> Trainer(model=peft_model, args=args, train_dataset=data, data_collator=collator).train()
    >>> handle.remove()
    ```
    """
    unwrap_fam_model(model)  # a ValueError naming the fix for a model that is not FAM
    if not check_loss_chunk(tokens, 0):  # the forward keyword's own check; 0 (off) has nothing to enable
        raise ValueError(f"enable_loss_chunk needs a positive number of tokens, got {tokens!r}.")

    def add_loss_chunk(module, args, kwargs):
        if not module.training or "fam_loss_chunk" in kwargs or kwargs.get("fused_lm_head"):
            return None
        if kwargs.get("labels") is None and kwargs.get("shift_labels") is None:
            return None
        return args, {**kwargs, "fam_loss_chunk": tokens}

    return model.register_forward_pre_hook(add_loss_chunk, with_kwargs=True)


__all__ = ["enable_loss_chunk"]
