"""Where FAM's extra prefill time goes on a GPU, phase by phase: one 8k read of the Llama-3.2-1B shape (bf16,
C=1024 M=3 F=64) at batch 1 and 8 with the device synchronised around each phase (plan and initial FAM, each
layer's chain, each layer's block attention), after warm-up reads that capture and keep the graphs; then one
layer's kept update graph replayed alone (the graph, and the graph with its input copies and output clones; per
update step: a graph of a group of `GROUP_STEPS` updates is divided by their number), and the read with the
chain run eagerly. Synchronising removes overlap, so phases add up to more than a read.

    python benchmarks/gpu_chain_timing.py [--out timing.json]
"""

from __future__ import annotations

import argparse
import json
import time
from collections import defaultdict

import torch

from hf_fam.apps.bench_real import build, preset, read
from hf_fam.modeling import fam_block_attention, fam_chain, fam_core, fam_graphs

TIMES: dict = defaultdict(float)
COUNTS: dict = defaultdict(int)


def timed(owner, name: str, label: str):
    original = getattr(owner, name)

    def wrapper(*args, **kwargs):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        out = original(*args, **kwargs)
        torch.cuda.synchronize()
        TIMES[label] += (time.perf_counter() - t0) * 1e3
        COUNTS[label] += 1
        return out

    setattr(owner, name, wrapper)
    return original


def seconds(fn, repeat: int) -> float:
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(repeat):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - t0) / repeat


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--out")
    args = p.parse_args()
    config = preset("llama-3.2-1b-gpu", prefill_lengths=[8192], decode_contexts=[1024])
    model = build("fam", config)
    rows = []
    for batch in (1, 8):
        ids = torch.randint(3, 1000, (batch, 8192), device="cuda")
        for _ in range(3):
            read(model, ids, config.chunk)
        whole = seconds(lambda: read(model, ids, config.chunk), 3) * 1e3
        one = seconds(lambda: read(model, ids, 0), 3) * 1e3
        TIMES.clear()
        COUNTS.clear()
        originals = [
            (fam_core.FAMRun, "start", timed(fam_core.FAMRun, "start", "plan + initial FAM")),
            (fam_chain.FAMChain, "run", timed(fam_chain.FAMChain, "run", "chain (per layer)")),
            (fam_block_attention.BlockAttention, "__call__",
             timed(fam_block_attention.BlockAttention, "__call__", "block attention incl. chain (per layer)")),
        ]
        synced = seconds(lambda: read(model, ids, config.chunk), 1) * 1e3
        for owner, name, original in originals:
            setattr(owner, name, original)
        phases = {k: round(v, 2) for k, v in TIMES.items()}
        # one layer's kept update graph, alone
        kept = {name[2]: g for name, g in fam_graphs.kept_graphs(model)
                if len(name) == 4 and g.inputs[0].shape[0] == batch}
        graph, per_replay = ((kept["update_group"], fam_graphs.GROUP_STEPS) if "update_group" in kept
                             else (kept["update"], 1))
        print(json.dumps({"batch": batch, "read_ms": whole, "one_forward_ms": one, "synced_read_ms": synced,
                          "phases_ms": phases, "phase_calls": dict(COUNTS)}), flush=True)
        with torch.inference_mode():
            replay = seconds(graph.graph.replay, 200) * 1e3 / per_replay  # per update step
            step = seconds(lambda: graph.step(*graph.inputs), 200) * 1e3 / per_replay
            eager = seconds(lambda: model(ids, use_cache=False, logits_to_keep=1, fam_cuda_graphs=False), 2) * 1e3
            graphed = seconds(lambda: model(ids, use_cache=False, logits_to_keep=1), 2) * 1e3
        row = {"batch": batch, "read_ms": round(whole, 2), "one_forward_ms": round(one, 2),
               "synced_read_ms": round(synced, 2), "phases_ms": phases, "phase_calls": dict(COUNTS),
               "graph_replay_ms": round(replay, 4), "graph_step_ms": round(step, 4),
               "one_forward_eager_chain_ms": round(eager, 2), "one_forward_graphs_ms": round(graphed, 2)}
        rows.append(row)
        print(json.dumps(row), flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"device": torch.cuda.get_device_name(0), "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
