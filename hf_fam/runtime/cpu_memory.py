"""Keep freed memory in the process for reuse: page faults were a quarter of CPU prefill time at batch 8.

PyTorch's CPU tensors come from the C library's `malloc`. glibc serves every block above its mmap threshold
(at most 32 MiB) with a fresh `mmap` and gives it back with `munmap` when the tensor is freed, so each large
activation (a batch-8 MLP intermediate at 8k tokens is 400 MB) is faulted in again page by page, with the
kernel zeroing every page. Measured on this project's machine (SmolLM2-135M shape, 6 layers, fp32, 2 threads,
batch 8, 4k tokens): a forward took 19-22 s, 5-10 s of it in the kernel, with 1.6-3.2 million minor faults;
with the heap kept, 14.4-15.5 s, under 1 s in the kernel, under 0.1 million faults. At batch 1 the gain is a
few per cent.

`keep_freed_memory()` tells glibc to serve large blocks from its heap and not to return freed heap memory to the
system (`mallopt(M_MMAP_MAX, 0)`, `mallopt(M_TRIM_THRESHOLD, ...)`), the same effect as the environment
variables `MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=...`. The price: the process keeps its peak heap, so its
resident memory no longer falls after a peak. It is process-wide and lasts until the process exits; importing
hf_fam never calls it. The `hf-fam` command line calls it before every command that reads without training
(see `suits`) unless the environment sets `HF_FAM_SYSTEM_MALLOC=1`.

Not for training: a LoRA step with gradient checkpointing frees and allocates blocks of many sizes, which
fragment a heap that is never given back. On the SmolLM2-135M shape cut to 4 layers, one step at 32k tokens
peaked at 12.0 GB resident with the heap kept against 4.2 GB with the system allocator (11.0 against 3.0 GB
after the forward alone), so `hf-fam finetune`, and `hf-fam bench` when it measures a training step, leave
the allocator alone. Elsewhere (musl, macOS, Windows) it does nothing and returns False; jemalloc or
tcmalloc preloaded with LD_PRELOAD do the same job their own way.

The system allocator fragments under training too, less: glibc raises its mmap threshold up to 32 MiB as large
blocks are freed, so mid-sized activations come from a heap that cannot shrink past live blocks. One LoRA step of
the full SmolLM2-135M shape at 4k tokens (30 layers, loss in chunks) held at most 1.9 GB live but peaked at 4.9 GB
resident. A fixed threshold keeps resident memory near live memory at the price of page faults:
`MALLOC_MMAP_THRESHOLD_=4194304` (4 MiB) peaked at 2.8 GB, one step 13 % slower; 1 MiB at 2.3 GB, 27 % slower
(single runs). That is a choice for whoever runs a long step near the machine's memory; benchmark results record
it (`allocator_environment`).
"""

from __future__ import annotations

import ctypes
import os
import sys

OPT_OUT_ENV = "HF_FAM_SYSTEM_MALLOC"  # set to 1: the command line leaves the C library's allocator as it is

_M_TRIM_THRESHOLD = -1  # glibc's mallopt parameters (malloc.h)
_M_MMAP_MAX = -4
_TRIM_NEVER = 2**31 - 1  # the largest value mallopt takes: heap memory is never given back

_applied = False


def _glibc():
    """The running process's glibc, or None (another C library, or not Linux)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(None)
        libc.gnu_get_libc_version  # only glibc has it
        libc.mallopt
    except (OSError, AttributeError):
        return None
    libc.mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    libc.mallopt.restype = ctypes.c_int
    return libc


def keep_freed_memory() -> bool:
    """Make glibc serve large blocks from its heap and keep freed memory for reuse (see the module's docstring).

    Returns True when the setting is in effect (now or from an earlier call), False where the C library is not
    glibc. Idempotent; it cannot be undone within the process.
    """
    global _applied
    if _applied:
        return True
    libc = _glibc()
    if libc is None:
        return False
    # mallopt returns 1 on success; both or neither: a heap that is trimmed would fault its pages in again
    _applied = bool(libc.mallopt(_M_TRIM_THRESHOLD, _TRIM_NEVER)) and bool(libc.mallopt(_M_MMAP_MAX, 0))
    return _applied


def freed_memory_kept() -> bool:
    """Whether `keep_freed_memory()` is in effect in this process (recorded with benchmark results)."""
    return _applied


def allocator_environment() -> dict:
    """glibc's allocator settings taken from the environment (`MALLOC_*_`, `GLIBC_TUNABLES`), recorded with
    benchmark results: e.g. `MALLOC_MMAP_THRESHOLD_=4194304` serves every block above 4 MiB with its own mapping,
    which keeps a long training step's resident memory near its live memory."""
    return {k: v for k, v in sorted(os.environ.items()) if k.startswith("MALLOC_") or k == "GLIBC_TUNABLES"}


def suits(args) -> bool:
    """Whether a parsed command keeps freed memory: its `keep_freed_memory` default (a bool, or a function of the
    arguments), True where it declares none."""
    keep = getattr(args, "keep_freed_memory", True)
    return bool(keep(args) if callable(keep) else keep)


def opted_out() -> bool:
    """True when the environment asks the command line to leave the allocator alone (HF_FAM_SYSTEM_MALLOC=1)."""
    return os.environ.get(OPT_OUT_ENV, "").strip().lower() in ("1", "true", "yes")
