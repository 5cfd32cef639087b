"""Where a FAM prefill's time goes on a GPU: one 8k-token read (chunks of 8 blocks through the cache, graphs
kept from the warm-up) of the Llama-3.2-1B shape in bf16 at C=1024 M=3 F=64, at batch 1 and 8, for BSWA and
FAM, under torch.profiler; and 8 decode steps after 1k tokens at batch 1. Prints the wall time, the GPU's busy
time (sum of kernel times) and the kernels and host calls that take the most, and writes them as JSON.

    python benchmarks/gpu_profile_chain.py [--out profile.json] [--tokens 8192]
"""

from __future__ import annotations

import argparse
import json
import time

import torch
from torch.profiler import ProfilerActivity, profile

from hf_fam.apps.bench_real import build, preset, read


def busy_ms(events) -> float:
    return sum(e.self_device_time_total for e in events if e.device_type == torch.autograd.DeviceType.CUDA) / 1e3


def summarise(prof, wall_ms: float, **labels) -> dict:
    events = prof.key_averages()
    kernels = sorted((e for e in events if e.self_device_time_total > 0), key=lambda e: -e.self_device_time_total)
    host = sorted(events, key=lambda e: -e.self_cpu_time_total)
    row = {
        **labels, "wall_ms": round(wall_ms, 2), "gpu_busy_ms": round(busy_ms(events), 2),
        "top_kernels": [(e.key[:90], e.count, round(e.self_device_time_total / 1e3, 2)) for e in kernels[:12]],
        "top_host": [(e.key[:90], e.count, round(e.self_cpu_time_total / 1e3, 2)) for e in host[:12]],
    }
    print(f"== {labels}: wall {row['wall_ms']} ms, GPU busy {row['gpu_busy_ms']} ms", flush=True)
    for name, count, ms in row["top_kernels"]:
        print(f"   gpu  {ms:9.2f} ms  x{count:<6} {name}")
    for name, count, ms in row["top_host"][:6]:
        print(f"   host {ms:9.2f} ms  x{count:<6} {name}")
    return row


def decode_row(model, variant: str) -> dict:
    ids = torch.randint(3, 1000, (1, 1025), device="cuda")
    with torch.inference_mode():
        cache = model(ids[:, :1024], use_cache=True, logits_to_keep=1).cache
        for _ in range(2):
            model(ids[:, 1024:], cache=cache, use_cache=True)
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            t0 = time.perf_counter()
            for _ in range(8):
                cache = model(ids[:, 1024:], cache=cache, use_cache=True).cache
            torch.cuda.synchronize()
            wall = (time.perf_counter() - t0) * 1e3 / 8
    return summarise(prof, wall, part="decode (ms per token)", variant=variant, context=1024)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--out")
    p.add_argument("--tokens", type=int, default=8192)
    args = p.parse_args()
    config = preset("llama-3.2-1b-gpu", prefill_lengths=[args.tokens], decode_contexts=[1024])
    models = {v: build(v, config) for v in ("bswa", "fam")}
    results = []
    for batch in (1, 8):
        ids = torch.randint(3, 1000, (batch, args.tokens), device="cuda")
        for variant, model in models.items():
            for _ in range(2):  # warm-up: kernels loaded, graphs captured and kept
                read(model, ids, config.chunk)
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            read(model, ids, config.chunk)
            torch.cuda.synchronize()
            wall = (time.perf_counter() - t0) * 1e3
            with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
                read(model, ids, config.chunk)
                torch.cuda.synchronize()
            results.append(summarise(prof, wall, part="prefill", batch=batch, variant=variant, tokens=args.tokens))
    for variant, model in models.items():
        results.append(decode_row(model, variant))
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"device": torch.cuda.get_device_name(0), "torch": torch.__version__, "rows": results}, f,
                      indent=1)


if __name__ == "__main__":
    main()
