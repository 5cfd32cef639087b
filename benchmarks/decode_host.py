"""Host time per decoded token: the Llama-3.2-1B layer count (16) and FAM settings (C=1024, M=3, F=64) at a tiny
width (hidden 64), so that a token's time is dispatch and Python, as it is for the 1B model on a GPU (27 ms a token
for FAM and BSWA against 15 ms for full attention on an H200). Full attention, BSWA and FAM share the weights; each
decodes `--steps` tokens after `--context` tokens, one at a time through its cache; interleaved rounds, medians.

    python benchmarks/decode_host.py [--context 2048] [--steps 64] [--rounds 5] [--device cpu] [--out decode.json]
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time

import torch

from hf_fam.apps.bench_real import shape_model
from hf_fam.modeling.fam_compat import CACHE_KWARG, output_cache
from hf_fam.modeling.modeling_fam import FAMForCausalLM

TINY = dict(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2, vocab_size=256)


def models(device: str, context: int) -> dict:
    torch.manual_seed(0)
    base = shape_model("llama-3.2-1b", device, context + 4096, **TINY)
    made = {"full": base}
    for variant, fam_length in (("bswa", 0), ("fam", 64)):
        made[variant] = FAMForCausalLM.from_base_model(base, block_size=1024, memory_segments=3,
                                                       fam_length=fam_length).eval()
    return made


def ms_per_token(model, cache, steps: int, device: str) -> float:
    token = torch.tensor([[7]], device=device)
    cache = copy.deepcopy(cache)
    with torch.inference_mode():
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(steps):
            cache = output_cache(model(token, **{CACHE_KWARG: cache}, use_cache=True))
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        return (time.perf_counter() - start) / steps * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--context", type=int, default=2048)
    parser.add_argument("--steps", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default=None, help="write the figures to this JSON file")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    made = models(args.device, args.context)
    ids = torch.randint(3, TINY["vocab_size"], (1, args.context), device=args.device)
    with torch.inference_mode():
        caches = {v: output_cache(m(ids, use_cache=True, logits_to_keep=1)) for v, m in made.items()}
    times: dict[str, list[float]] = {v: [] for v in made}
    for _ in range(args.rounds + 1):  # the first round warms up
        for variant, model in made.items():
            times[variant].append(ms_per_token(model, caches[variant], args.steps, args.device))
    times = {v: t[1:] for v, t in times.items()}
    result = {"context": args.context, "steps": args.steps, "rounds": args.rounds, "device": args.device,
              "threads": args.threads, "torch": torch.__version__, "ms_per_token": times,
              "median_ms": {v: statistics.median(t) for v, t in times.items()},
              "over_full": {v: statistics.median(a / b for a, b in zip(t, times["full"])) for v, t in times.items()}}
    for variant in made:
        print(f"{variant}: {result['median_ms'][variant]:.2f} ms/token, {result['over_full'][variant]:.2f}x full")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
