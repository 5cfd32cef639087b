"""What leaving a chunk's last FAM keys to the next chunk saves (`FAMChain.defers_probe`), on this machine.

A stream read in chunks of whole blocks at the SmolLM2-135M width (random weights, fp32, C=1024 M=3 F=64; fewer
layers than the checkpoint's 30: the chain's cost is per layer), with the probe deferred (the default) and with
it run at every chunk's end (as before), in interleaved rounds after a warm-up of each; medians and the median of
the per-round ratios.

    python benchmarks/deferred_probe.py [--tokens 8192] [--chunk-blocks 1] [--layers 4] [--rounds 7] [--out F]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from hf_fam.apps.bench_real import shape_model
from hf_fam.modeling import fam_chain
from hf_fam.modeling.modeling_fam import FAMForCausalLM

C = 1024
DEFERS = fam_chain.FAMChain.defers_probe


def read(model, ids, chunk: int, defer: bool) -> float:
    fam_chain.FAMChain.defers_probe = DEFERS if defer else (lambda self: False)
    try:
        start = time.perf_counter()
        with torch.inference_mode():
            cache = None
            for s in range(0, ids.shape[1], chunk):
                cache = model(ids[:, s : s + chunk], cache=cache, use_cache=True, logits_to_keep=1).cache
        return time.perf_counter() - start
    finally:
        fam_chain.FAMChain.defers_probe = DEFERS


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--tokens", type=int, default=8192)
    p.add_argument("--chunk-blocks", type=int, default=1)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    base = shape_model("smollm2-135m", "cpu", args.tokens + C, num_hidden_layers=args.layers)
    model = FAMForCausalLM.from_base_model(base, block_size=C, memory_segments=3, fam_length=64).eval()
    ids = torch.randint(3, base.config.vocab_size, (1, args.tokens), generator=torch.Generator().manual_seed(1))
    chunk = args.chunk_blocks * C
    for defer in (True, False):
        read(model, ids, chunk, defer)
    times = {True: [], False: []}
    for _ in range(args.rounds):
        for defer in (False, True):
            times[defer].append(read(model, ids, chunk, defer))
    ratios = [a / b for a, b in zip(times[True], times[False])]
    result = {"settings": vars(args), "deferred_s": [round(t, 3) for t in times[True]],
              "probe_each_chunk_s": [round(t, 3) for t in times[False]],
              "median_deferred_s": round(statistics.median(times[True]), 3),
              "median_probe_each_chunk_s": round(statistics.median(times[False]), 3),
              "median_ratio_deferred_over_probe": round(statistics.median(ratios), 4)}
    print(json.dumps(result), flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
