"""`hf_fam.runtime.cpu_memory`: with freed memory kept, a large tensor allocated again faults no pages in; the
command line applies it before a command unless HF_FAM_SYSTEM_MALLOC=1. The allocator is process-wide, so the
measurements run in a child process and leave this one as it is."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from hf_fam.runtime import cpu_memory

glibc_only = pytest.mark.skipif(cpu_memory._glibc() is None, reason="mallopt is glibc's")

# allocate, fill and free a 64 MiB tensor round after round, as a model's forwards do; print whether the setting
# took and each round's minor faults
CHILD = """
import resource, sys, torch
from hf_fam.runtime.cpu_memory import keep_freed_memory
kept = keep_freed_memory() if sys.argv[1] == "keep" else False
faults = []
for _ in range(8):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    x = torch.ones(16 * 2**20)
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    del x
print(kept, *faults)
"""


def _faults(mode: str) -> tuple[str, list[int]]:
    """(whether the setting took, minor faults of each round after the first) in a fresh child process."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    out = subprocess.run([sys.executable, "-c", CHILD, mode], capture_output=True, text=True, env=env, check=True)
    kept, _, *faults = out.stdout.split()
    return kept, [int(f) for f in faults]


@glibc_only
def test_kept_memory_is_reused_without_page_faults():
    # 64 MiB is 16,384 pages of 4 KiB. With the heap kept, a round can still miss the freed block (the heap settles
    # over a few rounds: in 50 children, at most 2 rounds after the first faulted); the system allocator maps the
    # tensor afresh every round
    kept, faults = _faults("keep")
    assert kept == "True"
    assert sum(f > 8000 for f in faults) <= 3 and min(faults) < 1000, faults
    kept, faults = _faults("system")
    assert kept == "False"
    assert all(f > 8000 for f in faults), faults


def test_keep_freed_memory_is_false_without_glibc(monkeypatch):
    monkeypatch.setattr(cpu_memory, "_applied", False)
    monkeypatch.setattr(cpu_memory, "_glibc", lambda: None)
    assert cpu_memory.keep_freed_memory() is False
    assert cpu_memory.freed_memory_kept() is False


@pytest.mark.parametrize("value, applied", [(None, True), ("1", False), ("true", False), ("0", True)])
def test_command_line_applies_it_unless_opted_out(monkeypatch, value, applied):
    from hf_fam.cli import main

    calls = []
    monkeypatch.setattr(cpu_memory, "keep_freed_memory", lambda: calls.append(1) or True)
    if value is None:
        monkeypatch.delenv(cpu_memory.OPT_OUT_ENV, raising=False)
    else:
        monkeypatch.setenv(cpu_memory.OPT_OUT_ENV, value)
    assert main(["generate", "nowhere", "--prompt", "hi"]) == 2  # fails after the setup: no such model
    assert calls == ([1] if applied else [])


@pytest.mark.parametrize("argv, applied", [
    (["finetune", "nowhere", "--output", "out"], False),  # training fragments a kept heap
    (["bench", "--parts", "train", "--out", "nowhere/x"], False),
    (["bench", "--parts", "decode", "--out", "nowhere/x"], True),
])
def test_training_commands_leave_the_allocator_alone(monkeypatch, argv, applied):
    from hf_fam.cli import main
    from hf_fam.cli.main import build_parser

    args = build_parser().parse_args(argv)
    assert cpu_memory.suits(args) is applied
    calls = []
    monkeypatch.setattr(cpu_memory, "keep_freed_memory", lambda: calls.append(1) or True)
    monkeypatch.delenv(cpu_memory.OPT_OUT_ENV, raising=False)
    if argv[0] == "finetune":
        main(argv)  # fails after the setup: no such model
        assert calls == []
