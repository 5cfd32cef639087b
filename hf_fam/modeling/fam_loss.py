"""The causal-LM loss of a long sequence without its (tokens x vocabulary) logits: `fam_loss_chunk=K`.

A training forward with `labels` makes logits for every token before the loss: at 32k tokens and a 49k
vocabulary that is 6.4 GB in fp32, and the loss's backward holds two more tensors of that size, far more than
the decoder's activations under gradient checkpointing. FAM reads long inputs; training on them should not
stop at the head. With `fam_loss_chunk=K` (a forward keyword of FAMForCausalLM and of patched models, passed on
by PEFT, accelerate and DDP like any other) the family's own forward runs with no logits kept, and the loss is
summed K tokens at a time from the decoder's final hidden states, each chunk's logits made again in backward
(activation checkpointing), so the head's memory is O(K x vocabulary) whatever the length.

The result is the loss the family computes (`ForCausalLMLoss`: labels shifted by one, -100 ignored, the mean
over counted tokens, or their sum / `num_items_in_batch`; `shift_labels` taken as given), equal within float
rounding, and its gradients likewise (tests/test_loss_chunk.py, every family). The head's logits are
`lm_head(hidden)` then what the family's head does after it (`family_logits`: Granite's `logits_scaling`,
Cohere's `logit_scale`, Gemma's `final_logit_softcapping`), as in every supported family; a
model with its own loss function or loss type is refused rather than given a different loss.
`outputs.logits` has zero positions: use a plain forward where the logits themselves are needed.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

IGNORE_INDEX = -100


def check_loss_chunk(loss_chunk, logits_to_keep) -> int:
    """`fam_loss_chunk` as a positive int (0: off); a clear error for anything else."""
    if loss_chunk is None or loss_chunk is False:
        return 0
    if isinstance(loss_chunk, bool) or not isinstance(loss_chunk, int) or loss_chunk < 0:
        raise ValueError(f"fam_loss_chunk must be a positive number of tokens (or 0/None: off), got {loss_chunk!r}.")
    if loss_chunk and not (isinstance(logits_to_keep, int) and logits_to_keep == 0):
        raise ValueError("fam_loss_chunk computes the loss over every token; it cannot be combined with "
                         "logits_to_keep. Pass one of them.")
    return loss_chunk


def check_head_loss(head: nn.Module) -> None:
    """Refuse a model whose loss is not the family's standard causal-LM loss (chunking would change it)."""
    if getattr(head, "_loss_function", None) is not None:
        raise ValueError(f"{type(head).__name__} has a custom loss_function; fam_loss_chunk computes only the "
                         "standard causal-LM loss. Drop fam_loss_chunk to use yours.")
    loss_type = getattr(head, "loss_type", None)
    if loss_type not in (None, "ForCausalLM"):
        raise ValueError(f"{type(head).__name__} uses loss_type={loss_type!r}; fam_loss_chunk computes only the "
                         "'ForCausalLM' loss. Drop fam_loss_chunk to use yours.")


def chunked_lm_loss(head: nn.Module, hidden: torch.Tensor, labels: torch.Tensor | None, chunk: int,
                    num_items_in_batch=None, shift_labels: torch.Tensor | None = None,
                    ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """The causal-LM loss of `hidden` (B, N, D; the decoder's final, normed output) under `head`'s lm_head.

    Args:
        head: the causal LM (its `get_output_embeddings()` and config).
        hidden: final hidden states.
        labels: (B, N) token ids, -100 where not counted; shifted here. Or None with `shift_labels`.
        chunk: tokens of `hidden` per logits computation.
        num_items_in_batch: when given, the loss is the sum over counted tokens divided by it (as
            transformers' Trainer passes it for gradient accumulation); else the mean.
        shift_labels: (B, N) targets already aligned with `hidden` (then `labels` is not shifted).
    """
    if shift_labels is None:
        if labels is None:
            raise ValueError("fam_loss_chunk needs labels (or shift_labels).")
        shift_labels = nn.functional.pad(labels, (0, 1), value=ignore_index)[..., 1:]
    shift_labels = shift_labels.to(hidden.device)
    if shift_labels.shape != hidden.shape[:2]:
        raise ValueError(f"labels have shape {tuple(shift_labels.shape)}, expected {tuple(hidden.shape[:2])}.")
    lm_head = head.get_output_embeddings()

    def chunk_loss(h: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        logits = family_logits(head.config, lm_head(h)).float()
        return nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1),
                                           ignore_index=ignore_index, reduction="sum")

    recompute = torch.is_grad_enabled() and (hidden.requires_grad or any(p.requires_grad for p in lm_head.parameters()))
    total = hidden.new_zeros((), dtype=torch.float32)
    for s in range(0, hidden.shape[1], chunk):
        h, t = hidden[:, s : s + chunk], shift_labels[:, s : s + chunk]
        total = total + (checkpoint(chunk_loss, h, t, use_reentrant=False) if recompute else chunk_loss(h, t))
    if num_items_in_batch is not None:
        if torch.is_tensor(num_items_in_batch):
            num_items_in_batch = num_items_in_batch.to(total.device)
        return total / num_items_in_batch
    return total / (shift_labels != ignore_index).sum()


def family_logits(config, logits: torch.Tensor) -> torch.Tensor:
    """What the families' causal-LM heads do after `lm_head`: Granite divides by `logits_scaling`, Cohere
    multiplies by `logit_scale`, Gemma 2/3 soft-cap at `final_logit_softcapping` (each sets one of them)."""
    scaling = getattr(config, "logits_scaling", None)
    if scaling is not None and scaling != 1:
        logits = logits / scaling
    scale = getattr(config, "logit_scale", None)
    if scale is not None and scale != 1:
        logits = logits * scale
    cap = getattr(config, "final_logit_softcapping", None)
    if cap:
        logits = torch.tanh(logits / cap) * cap
    return logits


def no_logits_index(device) -> torch.Tensor:
    """`logits_to_keep` that keeps no position: the family's forward then makes (B, 0, V) logits."""
    return torch.empty(0, dtype=torch.long, device=device)


__all__ = ["check_head_loss", "check_loss_chunk", "chunked_lm_loss", "family_logits", "no_logits_index"]
