"""Where FAM's prefill time goes next to BSWA's: torch.profiler over one read of N tokens (suite model: Llama
hidden 512, 8 layers, fp32, C = 256, M = 1, F = 16, 4k chunks through the cache), self time of the top
operators and of the matrix products grouped by their number of rows (4096: the chunk's tokens; 16: the FAM
chain's F tokens; 1: the last token's logits).

With `--preset` (an `hf-fam bench` preset, e.g. smollm2-135m-cpu: C = 1024, M = 3, F = 64) it profiles that
shape reading N tokens in one forward instead, with freed memory kept as `hf-fam bench` does (rows N: the
sequence; 64: the chain).

    python benchmarks/profile_cpu.py [N] [--preset NAME] [--out benchmarks/results/profile_cpu.json]
"""

from __future__ import annotations

import argparse
import json
import time

import torch
from torch.profiler import ProfilerActivity, profile

from hf_fam.apps.bench import BenchConfig, build, read

GEMMS = ("aten::mm", "aten::addmm", "aten::bmm", "aten::matmul", "aten::linear")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("n", type=int, nargs="?", default=16384)
    p.add_argument("--preset", help="an `hf-fam bench` preset, read in one forward")
    p.add_argument("--out", default="benchmarks/results/profile_cpu.json")
    args = p.parse_args()
    if args.preset:
        reader, result = _preset_reader(args.preset, args.n)
    else:
        config = BenchConfig()
        torch.set_num_threads(config.threads)
        result = {"n": args.n, "config": {"hidden": config.hidden, "layers": config.layers, "C": config.block_size,
                                          "M": config.memory_segments, "F": config.fam_length, "chunk": config.chunk}}

        def reader(variant):
            model = build(variant, config)
            read(model, 4096, config, chunked=True)  # warm-up
            return lambda: read(model, args.n, config, chunked=True)

    for variant in ("bswa", "fam"):
        run = reader(variant)
        with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
            t0 = time.perf_counter()
            run()
            seconds = time.perf_counter() - t0
        top = sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)[:10]
        gemm_rows: dict[str, float] = {}
        for e in prof.key_averages(group_by_input_shape=True):
            if e.key in GEMMS and e.input_shapes and len(e.input_shapes[0]) >= 2:
                rows = str(e.input_shapes[0][-2])
                gemm_rows[rows] = gemm_rows.get(rows, 0.0) + e.self_cpu_time_total / 1e6
        result[variant] = {"seconds": round(seconds, 3),
                           "top_self_s": {e.key: round(e.self_cpu_time_total / 1e6, 3) for e in top},
                           "calls": {e.key: e.count for e in top},
                           "gemm_self_s_by_rows": {k: round(v, 3) for k, v in sorted(gemm_rows.items())}}
        print(variant, json.dumps(result[variant]))
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)
    print("wrote", args.out)


def _preset_reader(name: str, n: int):
    """(a function of the variant that builds the preset's model, warms it up and returns its timed read; the
    result's header) for reading n tokens of an `hf-fam bench` preset in one forward."""
    from hf_fam.apps import bench_real
    from hf_fam.runtime.cpu_memory import keep_freed_memory

    keep_freed_memory()  # as `hf-fam bench` reads
    config = bench_real.preset(name, prefill_lengths=[n], train_lengths=[n], decode_contexts=[1024])
    torch.set_num_threads(config.threads)
    ids = bench_real._ids(config, 1, n)

    def reader(variant):
        model = bench_real.build(variant, config)
        bench_real.read(model, ids[:, : config.cpu_warmup_tokens], 0)  # warm-up
        return lambda: bench_real.read(model, ids, 0)

    header = {"n": n, "preset": name, "config": {"shape": config.shape, "C": config.block_size,
                                                 "M": config.memory_segments, "F": config.fam_length, "chunk": 0}}
    return reader, header


if __name__ == "__main__":
    main()
