"""A LoRA training step with the FAM chain recorded by autograd, recomputed step by step in backward
(hf_fam/modeling/fam_chain_grad.py), and recomputed with CUDA graphs (`TRAINING_GRAPHS`, CUDA only), against BSWA;
C=1024, M=3, F=64, gradient checkpointing (non-reentrant), batch 1. `--width tiny` keeps the Llama-3.2-1B layer
count (16) at hidden 64, where a chain step's time is dispatch and Python, as it is at the 1B shape on a GPU
(FAM's LoRA step cost BSWA + 12 ms per chain step on an H200); `--width real` is the full shape. Interleaved
rounds after a warm-up round, medians, ratios to BSWA round by round.

    python benchmarks/train_chain.py [--shape llama-3.2-1b] [--width tiny] [--tokens 8192] [--rounds 3]
        [--device cpu] [--dtype float32] [--block-size 1024] [--out train.json]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import time

import torch
from peft import get_peft_model

from hf_fam.apps.bench_real import shape_model
from hf_fam.modeling import fam_chain_grad
from hf_fam.modeling.fam_compat import enable_checkpointing
from hf_fam.modeling.modeling_fam import FAMForCausalLM
from hf_fam.training import unwrap_fam_model
from hf_fam.training.lora import fam_lora_config

TINY = dict(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2, vocab_size=256)


def build(args, fam_length: int):
    torch.manual_seed(0)
    overrides = {**(TINY if args.width == "tiny" else {}),
                 **({"num_hidden_layers": args.layers} if args.layers else {})}
    base = shape_model(args.shape, args.device, args.tokens + 8, **overrides)
    model = FAMForCausalLM.from_base_model(base.to(getattr(torch, args.dtype)), block_size=args.block_size,
                                           memory_segments=3, fam_length=fam_length)
    enable_checkpointing(model)
    model.enable_input_require_grads()
    return get_peft_model(model, fam_lora_config(model, r=args.rank)).train()


@contextlib.contextmanager
def chain_mode(mode: str):
    """"recorded": autograd records the chain; "recomputed": the default; "graphs": recomputed, CUDA graphs."""
    fam_chain_grad.TRAINING_GRAPHS = mode == "graphs"
    try:
        with fam_chain_grad.eager_autograd_chain() if mode == "recorded" else contextlib.nullcontext():
            yield
    finally:
        fam_chain_grad.TRAINING_GRAPHS = False


def seconds(model, ids, mode: str, device: str) -> float:
    with chain_mode(mode):
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        start = time.perf_counter()
        model(input_ids=ids, labels=ids).loss.backward()
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        elapsed = time.perf_counter() - start
    model.zero_grad(set_to_none=True)
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default="llama-3.2-1b")
    parser.add_argument("--width", choices=["tiny", "real"], default="tiny")
    parser.add_argument("--tokens", type=int, default=8192)
    parser.add_argument("--block-size", type=int, default=1024)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--layers", type=int, default=None, help="fewer layers than the shape's (a quick run)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default=None, help="write the figures to this JSON file")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    bswa, fam = build(args, 0), build(args, 64)
    runs = {"bswa": (bswa, "recomputed"), "fam_recorded": (fam, "recorded"), "fam_recomputed": (fam, "recomputed")}
    if args.device.startswith("cuda"):
        runs["fam_graphs"] = (fam, "graphs")
    ids = torch.randint(3, 256, (1, args.tokens), device=args.device)
    times: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(args.rounds + 1):  # the first round warms up (and captures the graphs)
        for name, (model, mode) in runs.items():
            times[name].append(seconds(model, ids, mode, args.device))
    times = {name: t[1:] for name, t in times.items()}
    layers = len(unwrap_fam_model(bswa).get_decoder().layers)
    chain_steps = layers * (args.tokens // args.block_size)
    median = {name: statistics.median(t) for name, t in times.items()}
    result = {
        "shape": args.shape, "width": args.width, "layers": layers, "tokens": args.tokens,
        "block_size": args.block_size,
        "memory_segments": 3, "fam_length": 64, "rank": args.rank, "rounds": args.rounds, "device": args.device,
        "device_name": torch.cuda.get_device_name(0) if args.device.startswith("cuda") else "cpu",
        "dtype": args.dtype, "threads": args.threads, "torch": torch.__version__, "seconds": times,
        "median_s": median,
        "over_bswa": {name: statistics.median(a / b for a, b in zip(t, times["bswa"])) for name, t in times.items()},
        "chain_steps": chain_steps,
        "ms_per_chain_step_over_bswa": {name: (median[name] - median["bswa"]) / chain_steps * 1e3 for name in runs},
    }
    for name in runs:
        print(f"{name}: {median[name]:.3f} s, {result['over_bswa'][name]:.3f}x BSWA, "
              f"{result['ms_per_chain_step_over_bswa'][name]:+.2f} ms per chain step", flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
