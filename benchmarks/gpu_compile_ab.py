"""Does compiling the chain's graph steps pay on a GPU? (hf_fam/modeling/fam_compile.py)

At the Llama-3.2-1B shape in bf16 (random weights, C=1024 M=3 F=64), side by side in one process:
- one layer's kept update graph replayed alone, plain and compiled: the step's GPU time (the first H200 session
  measured 0.156 ms plain at batch 1, 6x the time to read the layer's weights; a replay of a group of
  `GROUP_STEPS` updates, divided by their number);
- reads through the cache in chunks of 8k tokens of FAM with plain graphs replaying each update alone
  ("single") and in groups of `GROUP_STEPS` ("plain", the default), FAM with compiled graphs (grouped), and
  BSWA, in interleaved rounds (each after two warm-up reads that capture the graphs): batch 1 at 16k and 64k,
  batch 8 at 8k;
- how far the compiled read's last logits are from the plain one's (bf16, relative to the largest logit);
- how long the first compiled read took (the compilation of the kinds of step).

Prints one JSON row per measurement; --out writes them (after every row) with the verdicts `compiled_pays`: the
compiled FAM read was faster than the plain one in every row measured, and `groups_pay`: the grouped plain read
was faster than the single one in every row measured (`reads_measured` says how many).
benchmarks/gpu_real_shapes.sh passes the bench --compile-chain where it pays and cuda_checks.py (compiled graphs
against the eager chain, fp32 and bf16) passed.

    python benchmarks/gpu_compile_ab.py [--rounds 3] [--out compile_ab.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from hf_fam.apps.bench import interleaved, median_ratio, timed
from hf_fam.apps.bench_real import SHAPES, build, preset, read
from hf_fam.modeling import fam_compile, fam_graphs

READS = ((1, 16384), (1, 65536), (8, 8192))  # (batch, tokens)
STEP_REPLAYS = 200
GROUPED = fam_graphs.GROUP_STEPS  # the default group size


def random_ids(batch: int, n: int):
    gen = torch.Generator().manual_seed(n + batch)
    return torch.randint(3, SHAPES["llama-3.2-1b"]["vocab"], (batch, n), generator=gen).to("cuda")


def fam_read(model, ids, chunk: int, compiled: bool, grouped: bool = True):
    """A FAM read with compiled or plain graph steps, its updates replayed in groups (`GROUP_STEPS`) or alone."""
    fam_compile.COMPILE_STEPS = compiled
    fam_graphs.GROUP_STEPS = GROUPED if grouped else 1
    try:
        return read(model, ids, chunk)
    finally:
        fam_compile.COMPILE_STEPS = False
        fam_graphs.GROUP_STEPS = GROUPED


def kept_update_graph(model, batch: int, compiled: bool, grouped: bool = True):
    """The first layer's kept update graph at this batch size, plain or compiled (`FAMChain._graph`'s name), and
    the steps one replay runs: its group of `GROUP_STEPS` updates when `grouped` (chunks of 8 blocks), else its
    single update step; (None, 0) where it is not kept."""
    first = id(model.model.layers[0])
    kind = "update_group" if grouped else "update"
    for name, graph in fam_graphs.kept_graphs(model):
        if len(name) == 4 and name[0] == first and name[2:] == (kind, compiled) and graph.inputs[0].shape[0] == batch:
            return graph, (GROUPED if grouped else 1)
    return None, 0


def step_ms(graph, steps: int) -> float:
    """GPU time per update step of a kept graph replayed alone (`steps` updates a replay)."""
    torch.cuda.synchronize()
    start = time.perf_counter()
    with torch.inference_mode():
        for _ in range(STEP_REPLAYS):
            graph.graph.replay()
    torch.cuda.synchronize()
    return (time.perf_counter() - start) / STEP_REPLAYS / steps * 1e3


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--out")
    args = p.parse_args()
    config = preset("llama-3.2-1b-gpu", prefill_lengths=[max(n for _, n in READS)], decode_contexts=[1024],
                    train_lengths=[8192])
    models = {v: build(v, config) for v in ("bswa", "fam")}
    fam = models["fam"]
    result = {"device": torch.cuda.get_device_name(0), "torch": torch.__version__, "rows": []}

    def emit(row):
        result["rows"].append(row)
        print(json.dumps(row), flush=True)
        save()

    def save():  # after every row, so a run stopped by its time limit keeps what it measured
        measured = [r for r in result["rows"] if "compiled_over_plain" in r]
        result["compiled_pays"] = bool(measured) and all(r["compiled_over_plain"] < 1 for r in measured)
        result["groups_pay"] = bool(measured) and all(r["grouped_over_single"] < 1 for r in measured)
        result["reads_measured"] = f"{len(measured)} of {len(READS)}"
        if args.out:
            with open(args.out, "w") as f:
                json.dump(result, f, indent=1)

    first = random_ids(1, 8192)
    emit({"first_compiled_read_s": round(timed(lambda: fam_read(fam, first, config.chunk, True), "cuda"), 2)})
    with torch.inference_mode():
        last = {}
        for compiled in (False, True):
            fam_compile.COMPILE_STEPS = compiled
            try:
                last[compiled] = fam(first, use_cache=False, logits_to_keep=1).logits.float()
            finally:
                fam_compile.COMPILE_STEPS = False
    gap = ((last[True] - last[False]).abs().max() / last[False].abs().max()).item()
    emit({"logits_relative_gap_bf16": gap})
    for batch, n in READS:
        ids = random_ids(batch, n)
        fns = {"bswa": lambda: read(models["bswa"], ids, config.chunk),
               "fam_single": lambda: fam_read(fam, ids, config.chunk, False, grouped=False),
               "fam_plain": lambda: fam_read(fam, ids, config.chunk, False),
               "fam_compiled": lambda: fam_read(fam, ids, config.chunk, True)}
        times = interleaved(fns, args.rounds, "cuda")
        row = {"batch": batch, "n": n, **{f"{k}_s": round(statistics.median(t), 4) for k, t in times.items()},
               "single_over_bswa": round(median_ratio(times["fam_single"], times["bswa"]), 4),
               "plain_over_bswa": round(median_ratio(times["fam_plain"], times["bswa"]), 4),
               "grouped_over_single": round(median_ratio(times["fam_plain"], times["fam_single"]), 4),
               "compiled_over_bswa": round(median_ratio(times["fam_compiled"], times["bswa"]), 4),
               "compiled_over_plain": round(median_ratio(times["fam_compiled"], times["fam_plain"]), 4)}
        for label, compiled, grouped in (("single", False, False), ("plain", False, True), ("compiled", True, True)):
            graph, steps = kept_update_graph(fam, batch, compiled, grouped)
            row[f"update_step_{label}_ms"] = round(step_ms(graph, steps), 4) if graph is not None else None
        emit(row)
    print(json.dumps({k: result[k] for k in ("compiled_pays", "groups_pay", "reads_measured")}), flush=True)


if __name__ == "__main__":
    main()
