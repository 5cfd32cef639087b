"""Prefill benchmark: FAM vs BSWA (F = 0) vs the unmodified model (full attention, sdpa).

Small Llama (hidden 256, 4 layers, fp32), C = 256, M = 1, F = 16 by default. Times are medians over
several rounds in which the three variants run interleaved (this machine is noisy: compare only figures
from one run); peak memory is the peak RSS of a fresh process running one forward of one variant.

    python benchmarks/prefill.py                     # N = 1k, 4k, 16k; prints a table, writes JSON
    python benchmarks/prefill.py --lengths 1024 --rounds 2 --out /tmp/prefill.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

VARIANTS = ("fam", "bswa", "full")


def build(variant: str, args):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    import hf_fam

    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=args.hidden, intermediate_size=4 * args.hidden, num_hidden_layers=args.layers,
        num_attention_heads=args.heads, num_key_value_heads=args.heads, vocab_size=args.vocab,
        max_position_embeddings=max(args.lengths) + 1,
    )
    model = LlamaForCausalLM(config).eval()
    model.config._attn_implementation = "sdpa"
    if variant == "full":
        return model
    fam_length = args.fam_length if variant == "fam" else 0
    return hf_fam.FAMForCausalLM.from_base_model(
        model, block_size=args.block_size, memory_segments=args.memory_segments, fam_length=fam_length
    ).eval()


def forward(model, ids):
    import torch

    with torch.inference_mode():
        return model(ids, use_cache=False, logits_to_keep=1).logits


def one_process_peak(variant: str, n: int, args) -> float:
    """Peak RSS (MiB) of a fresh process during one forward of length n (model and imports included)."""
    cmd = [sys.executable, __file__, "--child", variant, str(n)] + _forward_args(args)
    out = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return float(out.stdout.strip().splitlines()[-1])


def _forward_args(args) -> list[str]:
    return [
        "--hidden", str(args.hidden), "--layers", str(args.layers), "--heads", str(args.heads),
        "--vocab", str(args.vocab), "--block-size", str(args.block_size),
        "--memory-segments", str(args.memory_segments), "--fam-length", str(args.fam_length),
        "--threads", str(args.threads), "--lengths", *map(str, args.lengths),
    ]


def child(variant: str, n: int, args) -> None:
    """Print the peak RSS (MiB) reached during one forward, sampled every millisecond."""
    import threading

    import psutil
    import torch

    torch.set_num_threads(args.threads)
    model = build(variant, args)
    ids = torch.randint(0, args.vocab, (1, n))
    forward(model, ids[:, :16])  # first-call allocations are not the forward's
    proc = psutil.Process()
    peak = [proc.memory_info().rss]
    done = threading.Event()

    def sample():
        while not done.is_set():
            peak[0] = max(peak[0], proc.memory_info().rss)
            time.sleep(0.001)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    forward(model, ids)
    done.set()
    sampler.join()
    peak[0] = max(peak[0], proc.memory_info().rss)
    print(peak[0] / 2**20)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--lengths", type=int, nargs="+", default=[1024, 4096, 16384])
    p.add_argument("--rounds", type=int, default=3, help="timed rounds per variant and length (after a warm-up)")
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--vocab", type=int, default=1000)
    p.add_argument("--block-size", type=int, default=256)
    p.add_argument("--memory-segments", type=int, default=1)
    p.add_argument("--fam-length", type=int, default=16)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--no-memory", action="store_true", help="skip the per-process peak-memory runs")
    p.add_argument("--out", default="benchmarks/results/prefill.json")
    p.add_argument("--child", nargs=2, metavar=("VARIANT", "N"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        child(args.child[0], int(args.child[1]), args)
        return {}

    import torch

    torch.set_num_threads(args.threads)
    models = {v: build(v, args) for v in VARIANTS}
    rows = []
    for n in args.lengths:
        ids = torch.randint(0, args.vocab, (1, n))
        for v in VARIANTS:  # warm-up
            forward(models[v], ids)
        times = {v: [] for v in VARIANTS}
        for _ in range(args.rounds):
            for v in VARIANTS:
                t0 = time.perf_counter()
                forward(models[v], ids)
                times[v].append(time.perf_counter() - t0)
        # ratios per round, then the median: robust to the machine's drifts
        fam_over_bswa = statistics.median(f / b for f, b in zip(times["fam"], times["bswa"]))
        full_over_fam = statistics.median(u / f for u, f in zip(times["full"], times["fam"]))
        row = {"n": n, **{f"{v}_s": statistics.median(times[v]) for v in VARIANTS},
               "fam_over_bswa": fam_over_bswa, "full_over_fam": full_over_fam}
        if not args.no_memory:
            for v in VARIANTS:
                row[f"{v}_peak_mib"] = one_process_peak(v, n, args)
        rows.append(row)
        print(_format_row(row, header=len(rows) == 1), flush=True)

    result = {
        "benchmark": "prefill",
        "settings": {k: getattr(args, k) for k in ("hidden", "layers", "heads", "vocab", "block_size",
                                                    "memory_segments", "fam_length", "threads", "rounds")},
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "torch": torch.__version__},
        "rows": rows,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(f"wrote {out}")
    return result


def _format_row(row: dict, header: bool) -> str:
    cols = ["n", "fam_s", "bswa_s", "full_s", "fam_over_bswa", "full_over_fam", "fam_peak_mib", "bswa_peak_mib", "full_peak_mib"]
    line = " | ".join(f"{row[c]:.3f}" if isinstance(row.get(c), float) else str(row.get(c, "-")) for c in cols)
    return (" | ".join(cols) + "\n" if header else "") + line


if __name__ == "__main__":
    main()
