"""How close can FAM prefill get to BSWA and how far below full attention, on this machine? (issue 2, item 7)

On the issue-2 model (Llama hidden 256, 4 layers, fp32, C = 256, M = 1, F = 16; one forward of N tokens)
it times, interleaved in each round: full attention (the unmodified model, sdpa), BSWA (F = 0), FAM, the
chain's update calls alone (the real decoder-layer call on F tokens, replayed as often as the forward
makes it), and the chain's *floor*: the work no implementation of docs/design.md §1 can skip. Each FAM update
is one decoder layer on F tokens and must wait for the previous one, so per layer and block it needs the
layer's seven projections (q, k, v, o, gate, up, down: the checkpoint's own Linear modules) on an F-row
input, and one attention of F queries over F + C keys. The floor runs exactly those calls, as many as the
FAM forward makes, with no norms, rotary, residuals or Python around them.

From these it derives what the chain leaves room for. Write FAM = BSWA + c (c: FAM's extra time). The
targets of issue 2 at 16k are FAM/BSWA <= 1.10 (BSWA >= 10 c) and full/FAM >= 3 (BSWA + c <= full / 3);
together they need 11 c <= full / 3, that is

    c <= full / 33     whatever BSWA's own time,

and then BSWA's time must fall in [10 c, full / 3 - c]. The script compares the measured c and the floor
with full / 33, and gives the best ratios the floor allows at the measured BSWA time. Figures are medians
over rounds, each round timing all five in turn; the machine is noisy.

    python benchmarks/prefill_bounds.py [--n 16384] [--rounds 7] [--out benchmarks/results/prefill_bounds.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
import torch.nn.functional as F

from hf_fam.apps.bench import BenchConfig, build, median_ratio, read
from hf_fam.modeling import fam_chain


def capture_updates(model, n: int, config: BenchConfig):
    """Run one forward of n tokens; return how many FAM update calls it made (all layers) and, per layer,
    the arguments of its first update call (to replay the real call in isolation)."""
    calls = {"update": 0}
    first = {}
    original = fam_chain.FAMChain.call_layer

    def counting(self, layer_idx, hidden, step, positions=None, **kwargs):
        if step.mode == "update":
            calls["update"] += 1
            first.setdefault(layer_idx, (self, hidden, step))
        return original(self, layer_idx, hidden, step, positions, **kwargs)

    fam_chain.FAMChain.call_layer = counting
    try:
        read(model, n, config, chunked=False)
    finally:
        fam_chain.FAMChain.call_layer = original
    return calls["update"], first


def chain_calls(first: dict, updates: int):
    """A function making the FAM forward's update calls alone: the real decoder-layer call on F tokens
    (norms, rotary, residuals, MLP and Python included), replayed with one block's inputs."""
    per_layer = updates // len(first)

    def run():
        with torch.inference_mode():
            for layer_idx, (chain, hidden, step) in first.items():
                for _ in range(per_layer):
                    again = fam_chain.FAMStep("update", step.inner, step.block_k, step.block_v, step.block_ok)
                    fam_chain.FAMChain.call_layer(chain, layer_idx, hidden, again)

    return run


def chain_floor(model, updates: int, config: BenchConfig):
    """A function running the floor's calls: per update, the layer's 7 projections on F rows + one attention."""
    layers = model.model.layers
    per_layer = updates // len(layers)
    F_len, C, D = config.fam_length, config.block_size, config.hidden
    heads = config.heads
    hd = D // heads
    x = torch.randn(1, F_len, D)
    q = torch.randn(1, heads, F_len, hd)
    kv = torch.randn(1, heads, F_len + C, hd)

    def run():
        with torch.inference_mode():
            for layer in layers:
                attn, mlp = layer.self_attn, layer.mlp
                for _ in range(per_layer):
                    attn.q_proj(x), attn.k_proj(x), attn.v_proj(x)
                    F.scaled_dot_product_attention(q, kv, kv)
                    attn.o_proj(x)
                    h = mlp.gate_proj(x)
                    mlp.up_proj(x)
                    mlp.down_proj(h)

    return run


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=16384)
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--out", default="benchmarks/results/prefill_bounds.json")
    args = p.parse_args()
    config = BenchConfig(hidden=256, layers=4, heads=4, vocab=1000, block_size=256, memory_segments=1,
                         fam_length=16, chunk=0, prefill_lengths=[args.n], full_max_length=args.n)
    torch.set_num_threads(config.threads)
    models = {v: build(v, config) for v in ("full", "bswa", "fam")}
    updates, first = capture_updates(models["fam"], args.n, config)
    fns = {v: (lambda m=m: read(m, args.n, config, chunked=False)) for v, m in models.items()}
    fns["floor"] = chain_floor(models["fam"], updates, config)
    fns["calls"] = chain_calls(first, updates)
    for fn in fns.values():  # warm-up
        fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for r in range(args.rounds):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
        print(f"round {r + 1}: " + "  ".join(f"{k} {v[-1]:.3f} s" for k, v in times.items()), flush=True)

    med = {k: statistics.median(v) for k, v in times.items()}
    extra = statistics.median(fam - bswa for bswa, fam in zip(times["bswa"], times["fam"]))
    bswa_floor = [bswa + floor for bswa, floor in zip(times["bswa"], times["floor"])]  # FAM at the floor
    result = {
        "n": args.n,
        "config": {"hidden": config.hidden, "layers": config.layers, "C": config.block_size,
                   "M": config.memory_segments, "F": config.fam_length, "threads": config.threads},
        "fam_update_calls": updates,
        "seconds": {k: round(v, 4) for k, v in med.items()},
        "fastest_seconds": {k: round(min(v), 4) for k, v in times.items()},
        "floor_ms_per_update": round(1e3 * med["floor"] / updates, 4),
        "call_ms_per_update": round(1e3 * med["calls"] / updates, 4),
        "extra_s": round(extra, 4),
        "extra_ms_per_update": round(1e3 * extra / updates, 4),
        "fam_over_bswa": round(median_ratio(times["fam"], times["bswa"]), 4),
        "full_over_fam": round(median_ratio(times["full"], times["fam"]), 4),
        "full_over_bswa": round(median_ratio(times["full"], times["bswa"]), 4),
        "best_fam_over_bswa": round(median_ratio(bswa_floor, times["bswa"]), 4),
        "best_full_over_fam": round(median_ratio(times["full"], bswa_floor), 4),
        "extra_budget_for_both_s": round(med["full"] / 33, 4),
        "rounds": {k: [round(t, 4) for t in v] for k, v in times.items()},
    }
    result["floor_within_budget"] = result["seconds"]["floor"] <= result["extra_budget_for_both_s"]
    result["extra_within_budget"] = result["extra_s"] <= result["extra_budget_for_both_s"]
    print(json.dumps({k: v for k, v in result.items() if k != "rounds"}, indent=1))
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)
    print("wrote", args.out)


if __name__ == "__main__":
    main()
