"""A regular block's attention without a mask (inference): the keys every query sees, then the block causally.

A regular block's queries (docs/design.md §2) all see the same keys first, the memory blocks and the FAM slots
the block reads, and then their own block causally. With a mask, sdpa scores every query against every key
slot, including the upper triangle of the own block, and reads the mask as it goes (on a GPU a mask also rules
out the flash kernel). Here the two parts are two mask-free calls of one of PyTorch's fused kernels, the second
with its causal flag (it skips the upper triangle), merged exactly by their log-sum-exps:

    out = (exp(lse_1 - m) · out_1 + exp(lse_2 - m) · out_2) / (exp(lse_1 - m) + exp(lse_2 - m)),  m = max(lse_1, lse_2)

The kernels (`_kernel`): the CPU's flash kernel; on CUDA the flash kernel for 16-bit floats and the
memory-efficient kernel for float32 (flash has no float32). Their log-sum-exp output carries no gradient,
so this runs only where autograd is off (prefill, evaluation, generation); training keeps the masked call.
It also needs the checkpoint's attention to be plain sdpa (no soft-capping, no dropout) and the private
kernel to exist in this torch; everything else falls back to the masked call, which computes the same values
(tests/test_block_shapes.py on the CPU, benchmarks/cuda_checks.py on a GPU). A CUDA kernel that refuses its
inputs (an old card, an odd head size) is remembered and the masked call used, with a warning once.
"""

from __future__ import annotations

import warnings

import torch

from .fam_compat import DROPPED_ATTENTION_KWARGS

_ATEN = torch.ops.aten
_CPU_KERNEL = getattr(_ATEN, "_scaled_dot_product_flash_attention_for_cpu", None)
_CUDA_FLASH = getattr(_ATEN, "_scaled_dot_product_flash_attention", None)
_CUDA_EFFICIENT = getattr(_ATEN, "_scaled_dot_product_efficient_attention", None)
# options under which the checkpoint's sdpa is a plain softmax(QK^T·scaling)V (the dropped ones never reach it);
# any other (soft-capping, attention sinks, ...) keeps the masked call
_PLAIN_KWARGS = {"dropout", "scaling"}
_REFUSED: set = set()  # (device type, dtype) whose CUDA kernel raised once: the masked call from then on
# devices whose kernels may refuse an input the checks above let through (an old card, an odd head size); on the
# CPU an error is a bug and is raised
REFUSABLE_DEVICES = ("cuda",)


def _kernel(query: torch.Tensor):
    """The fused kernel for this query's device and dtype, as f(q, k, v, causal, scale) -> (out (N, H, L, hd),
    lse (N, H, L) float32), or None."""
    device, dtype = query.device.type, query.dtype
    if (device, dtype) in _REFUSED:
        return None
    if device == "cpu" and _CPU_KERNEL is not None and dtype in (torch.float32, torch.bfloat16):
        return lambda q, k, v, causal, scale: _CPU_KERNEL(q, k, v, 0.0, causal, scale=scale)
    if device != "cuda":
        return None
    if dtype in (torch.float16, torch.bfloat16) and _CUDA_FLASH is not None:
        return lambda q, k, v, causal, scale: _CUDA_FLASH(q, k, v, 0.0, causal, False, scale=scale)[:2]

    def efficient(q, k, v, causal, scale):
        out, lse = _CUDA_EFFICIENT(q, k, v, None, True, 0.0, causal, scale=scale)[:2]
        return out, lse[..., : q.shape[2]]  # the kernel pads its log-sum-exp rows to a multiple of 32

    if dtype == torch.float32 and _CUDA_EFFICIENT is not None:
        return efficient
    return None


def split_attention_usable(inner: str, query: torch.Tensor, kwargs: dict) -> bool:
    """Whether `split_attention` computes what the checkpoint's own attention would for this call."""
    return (
        inner == "sdpa"
        and _kernel(query) is not None
        and not torch.is_grad_enabled()
        and not kwargs.get("dropout")
        and set(kwargs).difference(DROPPED_ATTENTION_KWARGS) <= _PLAIN_KWARGS
    )


def refuse_kernel(query: torch.Tensor, err: Exception) -> None:
    """Remember that this device's kernel raised on `query`'s dtype (the caller then takes the masked call), or
    raise `err` where kernels do not refuse (`REFUSABLE_DEVICES`)."""
    if query.device.type not in REFUSABLE_DEVICES:
        raise err
    _REFUSED.add((query.device.type, query.dtype))
    warnings.warn(
        f"FAM: the fused attention kernel refused this input ({type(err).__name__}: {err}); block attention "
        "uses the masked sdpa call instead (slower, same result).",
        stacklevel=3,
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
    kernel = _kernel(query)
    own_k, own_v = _repeat_kv(key[:, :, -length:], heads), _repeat_kv(value[:, :, -length:], heads)
    out, lse = kernel(query, own_k, own_v, True, scale)
    if visible > 0:
        # every query sees these keys, so the query heads that share a key/value head are stacked into one
        # longer query sequence of that head: no copies of the (long) shared keys and values
        stacked = query.reshape(batch, kv_heads, heads // kv_heads * length, head_dim)
        out_seen, lse_seen = kernel(stacked, key[:, :, :visible], value[:, :, :visible], False, scale)
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
