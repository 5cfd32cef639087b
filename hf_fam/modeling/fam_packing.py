"""Packed / padding-free batches (several documents in one row) are refused with one line.

TRL's `padding_free=True` and its `packing=True` (strategies "bfd", "bfd_split") put several documents in one row
and mark where each starts with `position_ids` that restart at 0 and with `cu_seq_lens_q/k` (for flash-attention's
variable-length kernels). A FAM model reads a row block by block and carries its memory from each block to the
next, so a document would read the memory of the one before it; FAM's block attention also has no per-document
mask. Rather than train silently across documents, the forward refuses such a batch.

Rows that concatenate documents with positions counting on (the paper's packing, `hf_fam.training.pack_dataset`,
TRL's `packing_strategy="wrapped"`) are ordinary rows and run.

This file ships with every converted checkpoint: it imports only torch.
"""

from __future__ import annotations

import torch

# keyword arguments that only packed / padding-free batches carry (transformers' flash-attention kwargs, TRL)
PACKED_KWARGS = ("cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k")

FIX = ("pad each document into its own row (TRL: SFTConfig(padding_free=False, packing=False), or "
       "packing_strategy='wrapped' to train across document boundaries as the FAM paper does)")


def packed_error(sign: str) -> str:
    return (f"FAM models do not support packed / padding-free batches ({sign}): the memory would carry from one "
            f"document into the next; {FIX}.")


def restarting_rows(position_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """(B,) bool: rows whose real tokens' positions fall back (a new document starting inside the row)."""
    pos = position_ids.long()
    if attention_mask is not None and attention_mask.dim() == 2 and attention_mask.shape[-1] == pos.shape[-1]:
        mask = attention_mask.to(device=pos.device, dtype=torch.bool)
        pos = pos.expand(mask.shape[0], -1)
    else:
        mask = torch.ones_like(pos, dtype=torch.bool)
    low = torch.iinfo(pos.dtype).min
    highest = torch.where(mask, pos, low).cummax(dim=1).values  # highest real position up to each token
    before = torch.cat([torch.full_like(highest[:, :1], low), highest[:, :-1]], dim=1)
    return (mask & (pos <= before)).any(dim=1)


def refuse_packed_inputs(position_ids: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
                         **kwargs) -> None:
    """Raise a one-line ValueError for a packed / padding-free batch; return quietly otherwise.

    Args:
        position_ids: (B, N) or (1, N) positions of this forward's tokens, or None.
        attention_mask: the 2D padding mask, if any (padding is not a restart).
        kwargs: the forward's other keyword arguments (`cu_seq_lens_q`, ... mark packed batches).
    """
    present = [name for name in PACKED_KWARGS if kwargs.get(name) is not None]
    if present:
        raise ValueError(packed_error(f"got {', '.join(present)}"))
    if isinstance(position_ids, torch.Tensor) and position_ids.dim() == 2 and position_ids.shape[-1] > 1:
        rows = restarting_rows(position_ids, attention_mask)
        if rows.any():
            row = int(rows.nonzero()[0, 0])
            raise ValueError(packed_error(f"position_ids restart inside row {row}"))


__all__ = ["PACKED_KWARGS", "packed_error", "refuse_packed_inputs", "restarting_rows"]
