"""A regular block's attention without a mask (CPU inference): the keys every query sees, then the block causally.

A regular block's queries (docs/design.md §2) all see the same keys first, the memory blocks and the FAM slots
the block reads, and then their own block causally. With a mask, sdpa scores every query against every key
slot, including the upper triangle of the own block, and reads the mask as it goes. Here the two parts are
two mask-free calls of PyTorch's CPU flash kernel, the second with its causal flag (it skips the upper
triangle), merged exactly by their log-sum-exps:

    out = (exp(lse_1 - m) · out_1 + exp(lse_2 - m) · out_2) / (exp(lse_1 - m) + exp(lse_2 - m)),  m = max(lse_1, lse_2)

The kernel's log-sum-exp output carries no gradient, so this runs only where autograd is off (prefill,
evaluation, generation); training keeps the masked call. It also needs the checkpoint's attention to be plain
sdpa on the CPU (no soft-capping, no dropout) and the private kernel to exist in this torch; everything else
falls back to the masked call, which computes the same values (tests/test_block_shapes.py).
"""

from __future__ import annotations

import torch

from .fam_compat import DROPPED_ATTENTION_KWARGS

_KERNEL = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
# options under which the checkpoint's sdpa is a plain softmax(QK^T·scaling)V (the dropped ones never reach it);
# any other (soft-capping, attention sinks, ...) keeps the masked call
_PLAIN_KWARGS = {"dropout", "scaling"}


def split_attention_usable(inner: str, query: torch.Tensor, kwargs: dict) -> bool:
    """Whether `split_attention` computes what the checkpoint's own attention would for this call."""
    return (
        _KERNEL is not None
        and inner == "sdpa"
        and query.device.type == "cpu"
        and query.dtype in (torch.float32, torch.bfloat16)
        and not torch.is_grad_enabled()
        and not kwargs.get("dropout")
        and set(kwargs).difference(DROPPED_ATTENTION_KWARGS) <= _PLAIN_KWARGS
    )


def split_attention(module, query, key, value, visible: int, kwargs: dict) -> torch.Tensor:
    """Attention of a regular block. Returns (N, L, H, hd), as the checkpoint's attention function does.

    Args:
        query: (N, H, L, hd), the block's L = C queries.
        key, value: (N, KVH, S, hd) laid out as [keys every query sees (the first `visible`), keys no query sees
            (FAM slots the block does not read), own block (the last L, causal)].
        visible: how many leading keys every query sees.
    """
    batch, heads, length, head_dim = query.shape
    kv_heads = key.shape[1]
    scale = kwargs.get("scaling", getattr(module, "scaling", None))
    own_k, own_v = _repeat_kv(key[:, :, -length:], heads), _repeat_kv(value[:, :, -length:], heads)
    out, lse = _KERNEL(query, own_k, own_v, 0.0, True, scale=scale)
    if visible > 0:
        # every query sees these keys, so the query heads that share a key/value head are stacked into one
        # longer query sequence of that head: no copies of the (long) shared keys and values
        stacked = query.reshape(batch, kv_heads, heads // kv_heads * length, head_dim)
        out_seen, lse_seen = _KERNEL(stacked, key[:, :, :visible], value[:, :, :visible], 0.0, False, scale=scale)
        out_seen = out_seen.reshape(batch, heads, length, -1)
        lse_seen = lse_seen.reshape(batch, heads, length)
        top = torch.maximum(lse, lse_seen)
        w_own, w_seen = (lse - top).exp()[..., None], (lse_seen - top).exp()[..., None]
        out = ((out.float() * w_own + out_seen.float() * w_seen) / (w_own + w_seen)).to(query.dtype)
    return out.transpose(1, 2)


def _repeat_kv(x: torch.Tensor, heads: int) -> torch.Tensor:
    """(N, KVH, S, hd) -> (N, H, S, hd): query head h reads key/value head h // (H / KVH), as transformers does."""
    n, kv_heads, s, d = x.shape
    if kv_heads == heads:
        return x
    return x[:, :, None].expand(n, kv_heads, heads // kv_heads, s, d).reshape(n, heads, s, d)
