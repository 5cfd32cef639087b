"""Streaming benchmark: memory and decode latency after long contexts, FAM vs full attention.

One process per variant reads a stream of random tokens (chunked prefill, `--chunk` tokens per forward)
up to the longest length, recording the process's peak RSS when the stream passes each length and
keeping a copy of the cache there (a FAMCache has constant size). Then decoding is timed at every
length *interleaved*, in several rounds (this machine is noisy: ratios are taken within a round, and
their median is reported). The unmodified model (full attention, sdpa, DynamicCache) runs only at the
lengths it can reach here (`--full-lengths`).

    python benchmarks/stream.py                                  # FAM at 1k, 32k, 256k, 1M; full at 1k, 32k
    python benchmarks/stream.py --lengths 1024 32768 --full-lengths 1024 --out /tmp/stream.json
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path


def build(variant: str, args):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    import hf_fam

    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=args.hidden, intermediate_size=4 * args.hidden, num_hidden_layers=args.layers,
        num_attention_heads=args.heads, num_key_value_heads=args.heads, vocab_size=args.vocab,
        max_position_embeddings=2**21,
    )
    model = LlamaForCausalLM(config).eval()
    model.config._attn_implementation = "sdpa"
    if variant == "full":
        return model
    return hf_fam.FAMForCausalLM.from_base_model(
        model, block_size=args.block_size, memory_segments=args.memory_segments, fam_length=args.fam_length
    ).eval()


def child(variant: str, lengths: list[int], args) -> dict:
    import psutil
    import torch

    torch.set_num_threads(args.threads)
    model = build(variant, args)
    gen = torch.Generator().manual_seed(0)
    cache, out, done = None, None, 0
    checkpoints = {}
    t0 = time.perf_counter()
    with torch.inference_mode():
        for length in sorted(lengths):
            while done < length:
                n = min(args.chunk, length - done)
                ids = torch.randint(0, args.vocab, (1, n), generator=gen)
                out = model(ids, cache=cache, use_cache=True, logits_to_keep=1)
                cache, done = out.cache, done + n
            checkpoints[length] = {
                "context": length,
                "read_s": time.perf_counter() - t0,
                "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                "rss_mib": psutil.Process().memory_info().rss / 2**20,
                "cache_mib": _cache_bytes(cache) / 2**20,
                "_cache": copy.deepcopy(cache),
                "_token": out.logits[:, -1:].argmax(-1),
            }
        # decode at every length, interleaved, several rounds
        per_round = {length: [] for length in checkpoints}
        for _ in range(args.rounds):
            for length, cp in checkpoints.items():
                c, token, times = copy.deepcopy(cp["_cache"]), cp["_token"], []
                for _ in range(args.decode_steps):
                    t = time.perf_counter()
                    o = model(token, cache=c, use_cache=True)
                    c, token = o.cache, o.logits[:, -1:].argmax(-1)
                    times.append(time.perf_counter() - t)
                per_round[length].append(statistics.median(times))
    shortest = min(checkpoints)
    rows = []
    for length, cp in checkpoints.items():
        row = {k: v for k, v in cp.items() if not k.startswith("_")}
        row["variant"] = variant
        row["decode_ms_per_token"] = 1e3 * statistics.median(per_round[length])
        row[f"decode_ratio_vs_{shortest}"] = statistics.median(
            a / b for a, b in zip(per_round[length], per_round[shortest])
        )
        rows.append(row)
    return {"variant": variant, "rows": rows}


def _cache_bytes(cache) -> int:
    return cache.nbytes() if hasattr(cache, "nbytes") else _dynamic_cache_bytes(cache)


def _dynamic_cache_bytes(cache) -> int:
    total = 0
    for layer in getattr(cache, "layers", []):
        for t in (getattr(layer, "keys", None), getattr(layer, "values", None)):
            if t is not None:
                total += t.numel() * t.element_size()
    return total


def _args_for_child(args) -> list[str]:
    out = []
    for name in ("hidden", "layers", "heads", "vocab", "block_size", "memory_segments", "fam_length", "threads",
                 "chunk", "decode_steps", "rounds"):
        out += [f"--{name.replace('_', '-')}", str(getattr(args, name))]
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--lengths", type=int, nargs="+", default=[1024, 32768, 262144, 1048576])
    p.add_argument("--full-lengths", type=int, nargs="*", default=[1024, 32768])
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--vocab", type=int, default=1000)
    p.add_argument("--block-size", type=int, default=256)
    p.add_argument("--memory-segments", type=int, default=1)
    p.add_argument("--fam-length", type=int, default=16)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--chunk", type=int, default=4096, help="tokens per prefill forward")
    p.add_argument("--decode-steps", type=int, default=300, help="decoded tokens timed per round (covers block completions)")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--out", default="benchmarks/results/stream.json")
    p.add_argument("--child", nargs="+", metavar="ARG", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        print(json.dumps(child(args.child[0], [int(x) for x in args.child[1:]], args)))
        return None

    rows = []
    for variant, lengths in (("fam", args.lengths), ("full", args.full_lengths)):
        if not lengths:
            continue
        cmd = [sys.executable, __file__] + _args_for_child(args) + ["--child", variant] + [str(n) for n in lengths]
        res = subprocess.run(cmd, capture_output=True, text=True)
        if res.returncode != 0:
            rows.append({"variant": variant, "error": res.stderr.strip().splitlines()[-3:]})
            print(rows[-1], flush=True)
            continue
        for row in json.loads(res.stdout.strip().splitlines()[-1])["rows"]:
            rows.append(row)
            print(json.dumps(row), flush=True)

    fam = {r["context"]: r for r in rows if r.get("variant") == "fam" and "error" not in r}
    summary = {}
    if 32768 in fam:
        summary["fam_peak_rss_longest_over_32k"] = fam[max(fam)]["peak_rss_mib"] / fam[32768]["peak_rss_mib"]
    if 262144 in fam:
        summary["fam_decode_256k_over_shortest"] = fam[262144][f"decode_ratio_vs_{min(fam)}"]
    if fam:
        summary["fam_decode_longest_over_shortest"] = fam[max(fam)][f"decode_ratio_vs_{min(fam)}"]
    import torch

    result = {
        "benchmark": "stream",
        "settings": {k: getattr(args, k) for k in ("hidden", "layers", "heads", "vocab", "block_size",
                                                    "memory_segments", "fam_length", "threads", "chunk",
                                                    "decode_steps", "rounds")},
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "torch": torch.__version__},
        "rows": rows,
        "summary": summary,
    }
    print(json.dumps(summary, indent=2))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(f"wrote {out}")
    return result


if __name__ == "__main__":
    main()
