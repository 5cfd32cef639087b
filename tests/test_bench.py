"""The benchmark suite's machinery on a tiny model: it writes its JSON, table and plots, and its CPU memory
figures are the child process's own (the figures themselves come from real runs, not tests)."""

from __future__ import annotations

import json
import sys

import pytest

from hf_fam.apps.bench import BenchConfig, peak_memory_mib, run

TINY = dict(hidden=64, layers=2, heads=2, vocab=101, block_size=32, memory_segments=1, fam_length=4, threads=1)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="VmHWM is Linux's")
def test_child_peak_memory_does_not_count_the_parent():
    """`ru_maxrss` of a fresh child starts at the parent's RSS at the fork; every variant then read the same
    peak. The child's own high-water mark must not include 600 MiB held by this process."""
    import torch

    from hf_fam.apps.bench import proc_status_mib

    held = torch.ones(600 * 2**20 // 4)  # noqa: F841  (600 MiB resident in the parent)
    parent = proc_status_mib("VmRSS")
    child = peak_memory_mib("fam", 256, BenchConfig(**TINY))
    assert child < parent - 300, (child, parent)


def test_suite_writes_json_table_and_plots(tmp_path):
    config = BenchConfig(**TINY, prefill_lengths=[128], full_max_length=128, chunk=64, train_length=64,
                         decode_contexts=[64, 128], decode_steps=2, rounds=1, parts=["prefill", "train", "decode"])
    result = run(config, tmp_path / "suite", log=lambda *_: None)
    saved = json.loads((tmp_path / "suite.json").read_text())
    assert saved["targets"] == result["targets"]
    assert [r["n"] for r in saved["prefill"]] == [128]
    assert {"full_s", "bswa_s", "fam_s", "fam_over_bswa", "fam_peak_mib"} <= set(saved["prefill"][0])
    assert "prefill FAM/BSWA <= 1.10" in saved["targets"] and "train FAM/BSWA <= 1.15" in saved["targets"]
    assert "| N | full s | BSWA s | FAM s |" in (tmp_path / "suite.md").read_text()
    assert (tmp_path / "suite_prefill.png").stat().st_size > 0


def test_prefill_bounds_script_counts_the_chain_and_writes_json(tmp_path):
    """benchmarks/prefill_bounds.py replays FAM's update calls through `FAMChain.call_layer`: if the chain
    stopped going through it, the count (one update per block and layer) would be wrong."""
    import subprocess
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    out = tmp_path / "bounds.json"
    subprocess.run([sys.executable, str(root / "benchmarks" / "prefill_bounds.py"), "--n", "1024", "--rounds", "1",
                    "--out", str(out)], check=True, capture_output=True, cwd=tmp_path, timeout=300)
    saved = json.loads(out.read_text())
    assert saved["fam_update_calls"] == 4 * (1024 // 256)  # 4 layers, 4 blocks of C = 256
    assert set(saved["seconds"]) == {"full", "bswa", "fam", "floor", "calls"}
    assert all(t > 0 for t in saved["seconds"].values())
    assert saved["extra_budget_for_both_s"] == pytest.approx(saved["seconds"]["full"] / 33, abs=1e-4)


def test_decode_host_script_writes_json(tmp_path):
    """benchmarks/decode_host.py, the host-time-per-token benchmark, runs end to end at a short context."""
    import subprocess
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    out = tmp_path / "decode.json"
    subprocess.run([sys.executable, str(root / "benchmarks" / "decode_host.py"), "--context", "96", "--steps", "3",
                    "--rounds", "1", "--out", str(out)], check=True, capture_output=True, cwd=tmp_path, timeout=300)
    saved = json.loads(out.read_text())
    assert set(saved["median_ms"]) == {"full", "bswa", "fam"}
    assert all(len(t) == 1 and t[0] > 0 for t in saved["ms_per_token"].values())
    assert saved["over_full"]["full"] == 1.0


def test_train_chain_script_writes_json(tmp_path):
    """benchmarks/train_chain.py, the LoRA step with the chain recorded, recomputed (and, on CUDA, graphed), runs
    end to end on a short sequence."""
    import subprocess
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    out = tmp_path / "train.json"
    subprocess.run([sys.executable, str(root / "benchmarks" / "train_chain.py"), "--tokens", "256", "--block-size",
                    "64", "--layers", "2", "--rounds", "1", "--out", str(out)],
                   check=True, capture_output=True, cwd=tmp_path, timeout=300)
    saved = json.loads(out.read_text())
    assert set(saved["median_s"]) == {"bswa", "fam_recorded", "fam_recomputed"}
    assert saved["chain_steps"] == 2 * 4 and saved["layers"] == 2
    assert all(len(t) == 1 and t[0] > 0 for t in saved["seconds"].values())
    assert saved["over_bswa"]["bswa"] == 1.0


def test_chain_memory_script_counts_what_the_chain_keeps(tmp_path):
    """benchmarks/chain_memory.py: each checkpointed layer keeps its chain's results until its recompute, about a
    tenth of the checkpoint's own input at the paper's C and F, and nothing after the backward."""
    import subprocess
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    out = tmp_path / "memory.json"
    subprocess.run([sys.executable, str(root / "benchmarks" / "chain_memory.py"), "--tokens", "1100", "--out",
                    str(out)], check=True, capture_output=True, cwd=tmp_path, timeout=300)
    saved = json.loads(out.read_text())
    assert saved["layers_checked"] == 2 and saved["kept_after_backward"] == 0
    # per layer, fp32: two blocks (one partial), each step's incoming memory (F x hidden) and the chain's keys and
    # values (F x 2 x KV width), plus the last memory (F x hidden)
    from hf_fam.apps.bench_real import SHAPES

    s, fam_length, itemsize = SHAPES[saved["shape"]], saved["fam_length"], 4
    kv_width = s["kv_heads"] * s["hidden"] // s["heads"]
    step = fam_length * (s["hidden"] + 2 * kv_width) * itemsize
    expected = 2 * step + fam_length * s["hidden"] * itemsize
    assert set(saved["kept_bytes_per_layer"].values()) == {expected}, saved
    assert saved["ratio"] == expected / (saved["tokens"] * s["hidden"] * itemsize)
