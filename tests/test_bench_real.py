"""The real-shape benchmark's machinery (`hf-fam bench --preset`): presets, the FLOP model, targets, and a run
on a tiny shape. The figures themselves come from real runs (benchmarks/results/), not from tests."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from hf_fam.apps import bench_real, bench_real_report
from hf_fam.apps.bench_real import PRESETS, SHAPES, attention_flops, preset
from hf_fam.cli import main

ROOT = Path(__file__).resolve().parents[1]


def test_presets_are_the_issue_shapes_at_the_paper_settings():
    smol, llama = PRESETS["smollm2-135m-cpu"], PRESETS["llama-3.2-1b-gpu"]
    assert SHAPES[smol.shape] == dict(hidden=576, layers=30, heads=9, kv_heads=3, intermediate=1536, vocab=49152)
    assert SHAPES[llama.shape] == dict(hidden=2048, layers=16, heads=32, kv_heads=8, intermediate=8192, vocab=128256)
    for config in (smol, llama):
        assert (config.block_size, config.memory_segments, config.fam_length) == (1024, 3, 64)
        assert config.batches == [1, 8] and config.chunk >= 8 * config.block_size and config.lora_rank == 64
    assert (smol.dtype, smol.device, llama.dtype, llama.device) == ("float32", "cpu", "bfloat16", "cuda")


def test_overrides_replace_preset_fields_and_are_checked():
    assert preset("smollm2-135m-cpu", prefill_lengths=[8192], rounds=None).prefill_lengths == [8192]
    assert preset("smollm2-135m-cpu").prefill_lengths == [8192, 16384, 32768, 65536]  # the preset is not changed
    with pytest.raises(ValueError, match="at least 8 blocks"):
        preset("smollm2-135m-cpu", chunk=4096)
    with pytest.raises(ValueError, match="unknown preset"):
        preset("gpt-5")


def test_flop_model_counts_what_each_query_sees():
    config = preset("smollm2-135m-cpu")
    ratios = [attention_flops(config, n)["full_over_bswa"] for n in (1024, 4096, 8192, 16384, 32768, 65536)]
    # within the window BSWA sees what full attention sees
    assert ratios[0] == pytest.approx(1.0) and ratios[1] == pytest.approx(1.0)
    assert ratios == sorted(ratios) and 1.1 < ratios[2] < 1.3 and 5.0 < ratios[-1] < 6.0
    # n = 2 blocks by hand: block 1 sees block 0 whole plus its own causally
    c = preset("smollm2-135m-cpu", block_size=4, memory_segments=1, chunk=32)
    f = attention_flops(c, 8)
    per_key = 30 * 4 * 9 * 64
    assert f["full"] - f["dense"] == per_key * 36 and f["bswa"] - f["dense"] == per_key * (10 + 4 * 4 + 10)


def test_targets_follow_the_device():
    cpu = preset("smollm2-135m-cpu")
    row = {"batch": 1, "n": 8192, "fam_over_bswa": 1.05, "full_over_bswa": 1.0, "flops_full_over_bswa": 1.2}
    t = bench_real_report.check_targets({"prefill": [row], "train": [{"n": 8192, "fam_over_bswa": 1.25}]}, cpu)
    assert t["prefill b=1 8192: FAM/BSWA <= 1.1"]["met"]
    assert not t["prefill b=1 8192: full/BSWA >= 0.9 x FLOP ratio 1.20"]["met"]  # 1.0 < 0.9 * 1.2
    assert not t["LoRA training step 8192: FAM/BSWA <= 1.2"]["met"]
    gpu = preset("llama-3.2-1b-gpu")
    t = bench_real_report.check_targets({"prefill": [{**row, "batch": 8, "n": 65536, "full_over_fam": 3.2}]}, gpu)
    assert t == {"prefill b=8 65536: FAM/BSWA <= 1.08": {"value": 1.05, "bound": 1.08, "met": True},
                 "prefill b=8 64k: full/FAM >= 3": {"value": 3.2, "bound": 3.0, "met": True}}


def test_a_tiny_shape_runs_every_part(tmp_path, monkeypatch):
    monkeypatch.setenv("MALLOC_ARENA_MAX", "2")  # recorded with the results, as MALLOC_MMAP_THRESHOLD_ would be
    monkeypatch.setitem(SHAPES, "tiny", dict(hidden=32, layers=2, heads=4, kv_heads=2, intermediate=64, vocab=101))
    monkeypatch.setitem(PRESETS, "tiny-cpu", bench_real.RealBenchConfig(
        shape="tiny", dtype="float32", device="cpu", block_size=8, memory_segments=1, fam_length=2,
        prefill_lengths=[64], batches=[1, 2], chunk=64, train_lengths=[32], lora_rank=4, decode_contexts=[16, 64],
        decode_steps=2, rounds=1, threads=1, cpu_warmup_tokens=16))  # 64-token reads warm up on 16 tokens
    assert main(["bench", "--preset", "tiny-cpu", "--out", str(tmp_path / "r"), "--batches", "2"]) == 0
    saved = json.loads((tmp_path / "r.json").read_text())
    assert [(r["batch"], r["n"]) for r in saved["prefill"]] == [(2, 64)]
    assert {"full_s", "bswa_chunked_s", "fam_chunked_s", "bswa_one_s", "fam_one_s", "fam_over_bswa",
            "flops_full_over_bswa"} <= set(saved["prefill"][0])
    assert saved["train"][0]["lora_rank"] == 4 and saved["train"][0]["fam_s"] > 0
    assert {(r["variant"], r["context"]) for r in saved["decode"]} == {
        (v, n) for v in ("full", "bswa", "fam") for n in (16, 64)}
    report = (tmp_path / "r.md").read_text()
    assert "| batch | N | full s |" in report
    assert saved["machine"]["allocator_env"] == {"MALLOC_ARENA_MAX": "2"} and "MALLOC_ARENA_MAX=2" in report
    assert saved["machine"]["peak_rss_mib"] > 0 and "peak RSS" in report.splitlines()[0]
    assert ALLOCATOR_WORDS[saved["machine"]["allocator"]] in report.splitlines()[0]


def test_a_run_stopped_part_way_keeps_each_row_measured(tmp_path, monkeypatch):
    """A time limit (the GPU run's `timeout`) can stop the benchmark in any part: what it measured is on disk."""
    monkeypatch.setitem(SHAPES, "tiny", dict(hidden=32, layers=2, heads=4, kv_heads=2, intermediate=64, vocab=101))
    config = bench_real.RealBenchConfig(
        shape="tiny", dtype="float32", device="cpu", block_size=8, memory_segments=1, fam_length=2,
        prefill_lengths=[64, 128], batches=[1], chunk=64, decode_contexts=[16], decode_steps=2, rounds=1, threads=1,
        parts=["prefill", "decode"])

    def stopped(*args, **kwargs):
        raise TimeoutError("stopped")

    monkeypatch.setattr(bench_real, "bench_decode", stopped)
    with pytest.raises(TimeoutError):  # a stem with dots, as the presets' names have
        bench_real.run(config, tmp_path / "r-3.2-1b", log=lambda *a: None)
    saved = json.loads((tmp_path / "r-3.2-1b.json").read_text())
    assert [r["n"] for r in saved["prefill"]] == [64, 128] and "prefill" in saved["part_seconds"]
    assert "| batch | N |" in (tmp_path / "r-3.2-1b.md").read_text()
    # no .tmp left
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r-3.2-1b.json", "r-3.2-1b.md", "r-3.2-1b_prefill.png"]


def test_a_size_out_of_device_memory_is_recorded_and_the_run_goes_on(tmp_path, monkeypatch):
    import torch

    monkeypatch.setitem(SHAPES, "tiny", dict(hidden=32, layers=2, heads=4, kv_heads=2, intermediate=64, vocab=101))
    config = bench_real.RealBenchConfig(
        shape="tiny", dtype="float32", device="cpu", block_size=8, memory_segments=1, fam_length=2,
        prefill_lengths=[64, 128], batches=[1], chunk=64, train_lengths=[64, 32], lora_rank=4, rounds=1, threads=1,
        parts=["prefill", "train"])
    real = bench_real.interleaved

    def short_of_memory(fns, rounds, device, warmup=None):  # the first prefill size and the first LoRA step
        part = "prefill" if "full" in fns else "train"
        if part not in raised:
            raised.add(part)
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 9.00 GiB\nmore detail")
        return real(fns, rounds, device, warmup=warmup)

    raised = set()
    monkeypatch.setattr(bench_real, "interleaved", short_of_memory)
    result = bench_real.run(config, tmp_path / "r", log=lambda *a: None)
    assert result["prefill"][0] == {"batch": 1, "n": 64,
                                    "error": "out of memory: CUDA out of memory. Tried to allocate 9.00 GiB"}
    assert result["prefill"][1]["n"] == 128 and result["prefill"][1]["fam_over_bswa"] > 0  # measured after it
    assert "error" in result["train"][0] and result["train"][1]["fam_s"] > 0
    missed = result["targets"]["prefill b=1 64: FAM/BSWA <= 1.1"]
    assert missed["value"] is None and not missed["met"] and missed["error"].startswith("out of memory")
    report = (tmp_path / "r.md").read_text()
    assert "| 1 | 64 | out of memory: CUDA out of memory. Tried to allocate 9.00 GiB |" in report
    assert "| LoRA training step 64: FAM/BSWA <= 1.2 | – | no |" in report


ALLOCATOR_WORDS = {"keep": ", freed memory kept", "huge_pages": ", huge pages", "system": ", system malloc"}


@pytest.mark.parametrize("machine, words", [
    ({"allocator": "huge_pages"}, ALLOCATOR_WORDS["huge_pages"]),
    ({"freed_memory_kept": False, "huge_pages": True}, ALLOCATOR_WORDS["huge_pages"]),  # results before the name
    ({"freed_memory_kept": True}, ALLOCATOR_WORDS["keep"]),
    ({"freed_memory_kept": False}, ALLOCATOR_WORDS["system"]),
    ({}, "2 CPUs, 2 threads; C="),  # the first results recorded no allocator
])
def test_the_report_names_the_allocator_of_old_and_new_results(machine, words):
    result = json.loads((ROOT / "benchmarks/results/smollm2-135m-cpu-train16k.json").read_text())
    for key in ("allocator", "freed_memory_kept", "huge_pages", "allocator_env", "peak_rss_mib", "torch"):
        result["machine"].pop(key, None)
    result["machine"].update(machine, cpus=2)
    assert words in bench_real_report.format_markdown(result).splitlines()[0]


def test_a_warm_up_replaces_the_first_untimed_call():
    from hf_fam.apps.bench import interleaved

    calls = []
    times = interleaved({"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}, 2, "cpu",
                        warmup={"a": lambda: calls.append("warm a"), "b": lambda: calls.append("warm b")})
    assert calls == ["warm a", "warm b", "a", "b", "a", "b"] and [len(t) for t in times.values()] == [2, 2]
    calls.clear()
    interleaved({"a": lambda: calls.append("a")}, 1, "cpu")
    assert calls == ["a", "a"]  # without one, each function warms itself up


def test_on_cuda_the_warm_up_runs_twice(monkeypatch):
    """Kept CUDA graphs capture a step on its first long chunk or its second sighting: two warm-up passes."""
    from hf_fam.apps import bench

    monkeypatch.setattr(bench, "timed", lambda fn, device: fn() or 0.0)
    calls = []
    bench.interleaved({"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}, 1, "cuda")
    assert calls == ["a", "b", "a", "b", "a", "b"]


@pytest.mark.parametrize("flag", ["--warmup-tokens", "--lora-rank"])
def test_a_bad_count_names_its_flag(flag, capsys):
    assert main(["bench", "--preset", "smollm2-135m-cpu", flag, "0"]) != 0
    assert f"{flag} must be >= 1, got 0" in capsys.readouterr().err


def test_the_stream_part_is_refused_with_a_preset(capsys):
    assert main(["bench", "--preset", "smollm2-135m-cpu", "--parts", "stream"]) != 0
    assert "1M-token stream is the small suite's" in capsys.readouterr().err


def test_compile_chain_is_on_for_the_run_only(tmp_path, monkeypatch):
    """`--compile-chain` switches `fam_compile.COMPILE_STEPS` on while the parts run, says so in the report, and
    puts the switch back (also when a part raises)."""
    from hf_fam.modeling import fam_compile

    monkeypatch.setitem(SHAPES, "tiny", dict(hidden=32, layers=2, heads=4, kv_heads=2, intermediate=64, vocab=101))
    config = bench_real.RealBenchConfig(
        shape="tiny", dtype="float32", device="cpu", block_size=8, memory_segments=1, fam_length=2,
        prefill_lengths=[64], batches=[1], chunk=64, decode_contexts=[16], rounds=1, threads=1, parts=["prefill"],
        compile_chain=True)
    seen = []
    monkeypatch.setattr(bench_real, "bench_prefill",
                        lambda config, models, emit: seen.append(fam_compile.COMPILE_STEPS))
    bench_real.run(config, tmp_path / "r", log=lambda *a: None)
    assert seen == [True] and fam_compile.COMPILE_STEPS is False
    assert "graph steps compiled (torch.compile)" in (tmp_path / "r.md").read_text().splitlines()[0]

    def stopped(config, models, emit):
        raise TimeoutError("stopped")

    monkeypatch.setattr(bench_real, "bench_prefill", stopped)
    with pytest.raises(TimeoutError):
        bench_real.run(config, tmp_path / "r", log=lambda *a: None)
    assert fam_compile.COMPILE_STEPS is False


def test_compile_chain_without_a_preset_is_refused(capsys):
    assert main(["bench", "--compile-chain"]) != 0
    assert "--compile-chain applies to the real shapes" in capsys.readouterr().err


def test_compile_chain_on_the_cpu_is_refused(capsys):
    """The chain's graph steps exist on CUDA only: a CPU run with --compile-chain would report a compiled chain
    that never ran."""
    assert main(["bench", "--preset", "smollm2-135m-cpu", "--compile-chain"]) != 0
    err = capsys.readouterr().err
    assert "--compile-chain compiles the FAM chain's CUDA graph steps, and this run is on cpu" in err
