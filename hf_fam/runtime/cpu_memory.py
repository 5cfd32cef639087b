"""How large CPU tensors get their memory: freed memory kept for reading, huge pages to save memory in training.

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
(see `mode`) unless the environment sets `HF_FAM_SYSTEM_MALLOC=1`.

Not for training: a LoRA step with gradient checkpointing frees and allocates blocks of many sizes, which
fragment a heap that is never given back. On the SmolLM2-135M shape cut to 4 layers, one step at 32k tokens
peaked at 12.0 GB resident with the heap kept against 4.2 GB with the system allocator (11.0 against 3.0 GB
after the forward alone), so the training commands do not keep freed memory: `hf-fam finetune` leaves the
allocator alone, `hf-fam bench` uses huge pages when it measures a training step (below). Elsewhere (musl,
macOS, Windows) both settings do nothing and return False; jemalloc or tcmalloc preloaded with LD_PRELOAD do the
same job their own way.

The system allocator fragments under training too, less: glibc raises its mmap threshold up to 32 MiB as large
blocks are freed, so mid-sized activations come from a heap that cannot shrink past live blocks. One LoRA step of
the full SmolLM2-135M shape at 4k tokens (30 layers, loss in chunks) held at most 1.9 GB live but peaked at 4.9 GB
resident. A fixed threshold keeps resident memory near live memory at the price of page faults:
`MALLOC_MMAP_THRESHOLD_=4194304` (4 MiB) peaked at 2.8 GB, one step 13 % slower; 1 MiB at 2.3 GB, 27 % slower
(single runs). Benchmark results record such variables (`allocator_environment`).

`use_huge_pages()` trades speed for memory in training; `hf-fam bench --parts train` applies it, `hf-fam finetune`
with `HF_FAM_ALLOCATOR=huge_pages`. PyTorch advises the kernel to back every tensor of 2 MiB and more with
transparent huge pages (`THP_MEM_ALLOC_ENABLE=1`, read by PyTorch at its first CPU allocation), and glibc
serves every block from 2 MiB up with its own mapping, given back when freed (`M_MMAP_THRESHOLD` fixed at 2 MiB;
`M_TRIM_THRESHOLD` 128 MiB, so the heap of smaller blocks keeps some freed memory). A large tensor then faults
once per 2 MiB instead of once per 4 KiB, and resident memory stays near live memory. One LoRA step of the full
SmolLM2-135M shape with FAM (C=1024, M=3, F=64, loss in chunks), fp32, 2 threads, single processes run one after
another on a noisy machine:

| N | allocator | step s | minor faults | peak RSS |
|---:|---|---:|---:|---:|
| 4k | system (default) | 63.9, 65.6 | 2.1-2.4 M | 6.9-7.3 GiB |
| 4k | freed memory kept | 45.3, 58.0, 58.2 | 0.2-0.3 M | 8.0-8.4 GiB |
| 4k | huge pages | 55.3, 55.8 | 2.9-3.0 M | 3.2-3.3 GiB |
| 16k | system (default) | 318.8 | 53.8 M | 6.3 GiB |
| 16k | huge pages | 292.0 | 4.3 M | 4.8 GiB |

At 4k each figure is the second step of a process. It is not always faster: `hf-fam finetune` of the real
SmolLM2-135M converted with C=256, M=1, F=16 (LoRA r=16, 3 steps of 2k tokens, three pairs of processes) took 58.1,
66.3, 74.2 s with huge pages against 46.9, 55.5, 60.0 s with the system allocator, the same losses, peaking at 6.7-6.8
against 9.5-9.6 GiB. So `hf-fam finetune` leaves the allocator alone unless asked.

It needs the kernel's transparent huge pages (`/sys/kernel/mm/transparent_hugepage/enabled` `always` or `madvise`)
and must come before PyTorch's first CPU allocation: called later, it checks that a fresh 4 MiB tensor's mapping is
advised, finds it is not, changes nothing and returns False. The two settings exclude each other: a process has one.
"""

from __future__ import annotations

import ctypes
import os
import sys

OPT_OUT_ENV = "HF_FAM_SYSTEM_MALLOC"  # set to 1: the command line leaves the C library's allocator as it is
ALLOCATOR_ENV = "HF_FAM_ALLOCATOR"  # keep, huge_pages or system: the command line's setting, whatever the command

_M_TRIM_THRESHOLD = -1  # glibc's mallopt parameters (malloc.h)
_M_MMAP_THRESHOLD = -3
_M_MMAP_MAX = -4
_TRIM_NEVER = 2**31 - 1  # the largest value mallopt takes: heap memory is never given back

HUGE_PAGE_BYTES = 2 * 2**20  # PyTorch advises huge pages from this size up (its gAlloc_threshold_thp)
HUGE_PAGES_TRIM_BYTES = 128 * 2**20  # with huge pages: freed memory the heap of small blocks keeps
THP_ENV = "THP_MEM_ALLOC_ENABLE"  # PyTorch's switch, read once, at its first CPU allocation
THP_SETTING = "/sys/kernel/mm/transparent_hugepage/enabled"

KEEP, HUGE_PAGES, SYSTEM = "keep", "huge_pages", "system"
SETTINGS = (KEEP, HUGE_PAGES, SYSTEM)  # what a command (or HF_FAM_ALLOCATOR) can ask for (`mode`)

_applied = False  # keep_freed_memory() is in effect
_huge_pages = False  # use_huge_pages() is in effect


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
    if libc is None or _huge_pages:
        return False
    # mallopt returns 1 on success; both or neither: a heap that is trimmed would fault its pages in again
    _applied = bool(libc.mallopt(_M_TRIM_THRESHOLD, _TRIM_NEVER)) and bool(libc.mallopt(_M_MMAP_MAX, 0))
    return _applied


def transparent_huge_pages() -> bool:
    """Whether the kernel backs memory advised with MADV_HUGEPAGE by huge pages (its setting, the bracketed word,
    is `always` or `madvise`)."""
    try:
        with open(THP_SETTING) as f:
            setting = f.read()
    except OSError:
        return False
    return "[always]" in setting or "[madvise]" in setting


def _advised_huge(address: int) -> bool:
    """Whether the mapping that holds `address` is advised for huge pages (flag `hg` in /proc/self/smaps)."""
    try:
        with open("/proc/self/smaps") as f:
            inside = False
            for line in f:
                head = line.split(maxsplit=1)[0]
                if "-" in head and not head.endswith(":"):  # a mapping's first line: start-end perms ...
                    start, end = (int(x, 16) for x in head.split("-"))
                    inside = start <= address < end
                elif inside and head == "VmFlags:":
                    return "hg" in line.split()[1:]
    except (OSError, ValueError):
        pass
    return False


def use_huge_pages() -> bool:
    """Back large CPU tensors with transparent huge pages and give large blocks back when freed (see the module's
    docstring).

    Returns True when the setting is in effect (now or from an earlier call); False, changing nothing, where the
    C library is not glibc, the kernel's transparent huge pages are off, `THP_MEM_ALLOC_ENABLE` is set to something
    other than 1, `keep_freed_memory()` came first, or PyTorch allocated before the call (it reads its switch once;
    torch 2.6 already when imported: there set `THP_MEM_ALLOC_ENABLE=1` before Python starts instead).
    """
    global _huge_pages
    if _huge_pages:
        return True
    libc = _glibc()
    if libc is None or _applied or not transparent_huge_pages():
        return False
    ours = THP_ENV not in os.environ
    if os.environ.setdefault(THP_ENV, "1") != "1":
        return False
    import torch

    probe = torch.empty(2 * HUGE_PAGE_BYTES, dtype=torch.uint8)
    advised = _advised_huge(probe.data_ptr())
    del probe
    if not advised:  # PyTorch read its switch before this call
        if ours:
            del os.environ[THP_ENV]
        return False
    _huge_pages = bool(libc.mallopt(_M_MMAP_THRESHOLD, HUGE_PAGE_BYTES)) and bool(
        libc.mallopt(_M_TRIM_THRESHOLD, HUGE_PAGES_TRIM_BYTES)
    )
    return _huge_pages


def in_effect() -> str:
    """The setting in effect in this process, one of SETTINGS (recorded with benchmark results)."""
    return HUGE_PAGES if _huge_pages else KEEP if _applied else SYSTEM


def allocator_environment() -> dict:
    """glibc's allocator settings taken from the environment (`MALLOC_*_`, `GLIBC_TUNABLES`) and PyTorch's huge
    page switch, recorded with benchmark results: e.g. `MALLOC_MMAP_THRESHOLD_=4194304` serves every block above
    4 MiB with its own mapping, which keeps a long training step's resident memory near its live memory."""
    keys = ("GLIBC_TUNABLES", THP_ENV)
    return {k: v for k, v in sorted(os.environ.items()) if k.startswith("MALLOC_") or k in keys}


def mode(args) -> str:
    """The setting for a parsed command: HF_FAM_ALLOCATOR where the environment sets it, else the command's
    `allocator` default (KEEP, HUGE_PAGES or SYSTEM, or a function of the arguments that returns one), KEEP where
    it declares none."""
    asked = os.environ.get(ALLOCATOR_ENV, "").strip()
    where = ALLOCATOR_ENV
    if not asked:
        asked, where = getattr(args, "allocator", KEEP), "allocator setting"
        asked = asked(args) if callable(asked) else asked
    if asked not in SETTINGS:
        raise ValueError(f"unknown {where} {asked!r}; use one of {', '.join(SETTINGS)}")
    return asked


def apply(setting: str) -> bool:
    """Apply KEEP (`keep_freed_memory`) or HUGE_PAGES (`use_huge_pages`); SYSTEM changes nothing. Returns whether
    a setting is in effect."""
    if setting == KEEP:
        return keep_freed_memory()
    if setting == HUGE_PAGES:
        return use_huge_pages()
    return False


def opted_out() -> bool:
    """True when the environment asks the command line to leave the allocator alone (HF_FAM_SYSTEM_MALLOC=1)."""
    return os.environ.get(OPT_OUT_ENV, "").strip().lower() in ("1", "true", "yes")
