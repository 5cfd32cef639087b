"""`hf_fam.runtime.cpu_memory`: with freed memory kept, a large tensor allocated again faults no pages in; with huge
pages, its mapping is advised for them and it faults once per 2 MiB, not per 4 KiB. The command line applies the
setting its command asks for unless HF_FAM_SYSTEM_MALLOC=1. The allocator is process-wide, so the measurements run
in a child process and leave this one as it is."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from hf_fam.runtime import cpu_memory

glibc_only = pytest.mark.skipif(cpu_memory._glibc() is None, reason="mallopt is glibc's")

# apply a setting (or none), then allocate, fill and free a 64 MiB tensor round after round, as a model's forwards
# do; print whether the setting took, whether the tensor's mapping is advised for huge pages, and each round's
# minor faults
CHILD = """
import os, resource, sys, torch
from hf_fam.runtime import cpu_memory
if sys.argv[1] == "late":  # PyTorch allocates first: it has read its huge page switch
    torch.ones(1)
took = cpu_memory.apply({"late": "huge_pages"}.get(sys.argv[1], sys.argv[1]))
assert not (sys.argv[1] == "late" and cpu_memory.THP_ENV in os.environ)  # a setting that did not take is undone
faults, advised = [], []
for _ in range(8):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    x = torch.ones(16 * 2**20)
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    advised.append(cpu_memory._advised_huge(x.data_ptr()))
    del x
print(took, all(advised), *faults)
"""


def _faults(mode: str) -> tuple[str, str, list[int]]:
    """(whether the setting took, whether every tensor was advised for huge pages, minor faults of each round
    after the first) in a fresh child process."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_") and k != cpu_memory.THP_ENV}
    out = subprocess.run([sys.executable, "-c", CHILD, mode], capture_output=True, text=True, env=env, check=True)
    took, advised, _, *faults = out.stdout.split()
    return took, advised, [int(f) for f in faults]


@glibc_only
def test_kept_memory_is_reused_without_page_faults():
    # 64 MiB is 16,384 pages of 4 KiB. With the heap kept, a round can still miss the freed block (the heap settles
    # over a few rounds: in 50 children, at most 2 rounds after the first faulted); the system allocator maps the
    # tensor afresh every round
    kept, advised, faults = _faults("keep")
    assert (kept, advised) == ("True", "False")
    assert sum(f > 8000 for f in faults) <= 3 and min(faults) < 1000, faults
    kept, advised, faults = _faults("system")
    assert (kept, advised) == ("False", "False")
    assert all(f > 8000 for f in faults), faults


@glibc_only
@pytest.mark.skipif(not cpu_memory.transparent_huge_pages(), reason="the kernel's transparent huge pages are off")
@pytest.mark.skipif(tuple(int(v) for v in torch.__version__.split("+")[0].split(".")[:2]) < (2, 13),
                    reason="torch 2.6.0 reads its huge page switch when imported, before a script can call "
                    "use_huge_pages() (which then returns False, changing nothing); 2.13 reads it at its first "
                    "large allocation")
def test_huge_pages_back_large_tensors():
    # every round maps the tensor afresh (given back when freed), advised for huge pages: where the kernel has one
    # free it faults once per 2 MiB, plus 4 KiB pages at the unaligned ends (about 550 faults here, against 16,384);
    # a busy machine may fall back to small pages now and then
    took, advised, faults = _faults("huge_pages")
    assert (took, advised) == ("True", "True")
    assert sorted(faults)[len(faults) // 2] < 4000, faults
    # PyTorch read its switch at its first allocation, before the call: nothing changes, and the call says so
    took, advised, faults = _faults("late")
    assert (took, advised) == ("False", "False")
    assert all(f > 8000 for f in faults), faults


def test_settings_are_false_without_glibc_or_huge_pages(monkeypatch, tmp_path):
    monkeypatch.setattr(cpu_memory, "_applied", False)
    monkeypatch.setattr(cpu_memory, "_huge_pages", False)
    monkeypatch.setattr(cpu_memory, "_glibc", lambda: None)
    assert cpu_memory.keep_freed_memory() is False and cpu_memory.in_effect() == cpu_memory.SYSTEM
    assert cpu_memory.use_huge_pages() is False and cpu_memory.in_effect() == cpu_memory.SYSTEM
    monkeypatch.setattr(cpu_memory, "_glibc", lambda: object())  # glibc, but the kernel says never
    (tmp_path / "enabled").write_text("always madvise [never]\n")
    monkeypatch.setattr(cpu_memory, "THP_SETTING", str(tmp_path / "enabled"))
    assert cpu_memory.transparent_huge_pages() is False and cpu_memory.use_huge_pages() is False


def test_a_command_asks_for_one_setting():
    with pytest.raises(ValueError, match="unknown allocator setting 'heap'; use one of keep, huge_pages, system"):
        cpu_memory.mode(type("Args", (), {"allocator": "heap"})())
    assert cpu_memory.mode(object()) == cpu_memory.KEEP  # a command that declares none reads


def test_the_environment_chooses_for_any_command(monkeypatch):
    from hf_fam.cli.main import build_parser

    args = build_parser().parse_args(["finetune", "nowhere", "--output", "out"])
    monkeypatch.setenv(cpu_memory.ALLOCATOR_ENV, "huge_pages")
    assert cpu_memory.mode(args) == cpu_memory.HUGE_PAGES
    monkeypatch.setenv(cpu_memory.ALLOCATOR_ENV, "hugepages")
    with pytest.raises(ValueError, match="unknown HF_FAM_ALLOCATOR 'hugepages'; use one of keep, huge_pages, system"):
        cpu_memory.mode(args)


@pytest.mark.parametrize("value, applied", [(None, ["keep"]), ("1", []), ("true", []), ("0", ["keep"])])
def test_command_line_applies_it_unless_opted_out(monkeypatch, value, applied):
    from hf_fam.cli import main

    calls = []
    monkeypatch.setattr(cpu_memory, "apply", lambda setting: calls.append(setting) or True)
    if value is None:
        monkeypatch.delenv(cpu_memory.OPT_OUT_ENV, raising=False)
        monkeypatch.delenv(cpu_memory.ALLOCATOR_ENV, raising=False)
    else:
        monkeypatch.setenv(cpu_memory.OPT_OUT_ENV, value)
    assert main(["generate", "nowhere", "--prompt", "hi"]) == 2  # fails after the setup: no such model
    assert calls == applied


@pytest.mark.parametrize("argv, setting", [
    (["finetune", "nowhere", "--output", "out"], "system"),  # training fragments a kept heap
    (["bench", "--parts", "train", "--out", "nowhere/x"], "huge_pages"),
    (["bench", "--parts", "prefill", "train", "--out", "nowhere/x"], "huge_pages"),
    (["bench", "--parts", "decode", "--out", "nowhere/x"], "keep"),
    (["eval", "nowhere"], "keep"),
])
def test_each_command_asks_for_its_setting(monkeypatch, argv, setting):
    from hf_fam.cli import main
    from hf_fam.cli.main import build_parser

    assert cpu_memory.mode(build_parser().parse_args(argv)) == setting
    calls = []

    def apply(s):  # record the setting, then stop the command before it loads anything
        calls.append(s)
        raise ValueError("stopped after the allocator setting")

    monkeypatch.setattr(cpu_memory, "apply", apply)
    monkeypatch.delenv(cpu_memory.OPT_OUT_ENV, raising=False)
    monkeypatch.delenv(cpu_memory.ALLOCATOR_ENV, raising=False)
    assert main(argv) == 2
    assert calls == [setting]
