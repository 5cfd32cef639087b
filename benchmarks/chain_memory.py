"""What the recomputed training chain (hf_fam/modeling/fam_chain_grad.py) holds between a training forward and
the backward: under gradient checkpointing each checkpointed layer keeps its chain's results (each step's
incoming memory, the chain's keys and values, the last memory) until that layer's recompute. Counted per layer
against the checkpoint's own saved input of the layer (batch x tokens x hidden), at C=1024, M=3, F=64, LoRA,
random weights, and checked to be gone after the backward. Two layers of the shape suffice: the count is per
layer. Per block it is F x (hidden + 2 x KV heads x head size) against C x hidden (10.4 % at the SmolLM2-135M
shape, 9.4 % at the 1B shape), plus one step's worth per layer, so the ratio falls towards that with length.

    python benchmarks/chain_memory.py [--shape smollm2-135m] [--tokens 4096] [--out memory.json]
"""

from __future__ import annotations

import argparse
import json

import torch
from peft import get_peft_model

from hf_fam.apps.bench_real import SHAPES, shape_model
from hf_fam.modeling.fam_chain import FAMChain
from hf_fam.modeling.fam_compat import enable_checkpointing
from hf_fam.modeling.modeling_fam import FAMForCausalLM
from hf_fam.training.lora import fam_lora_config


def nbytes(value) -> int:
    if isinstance(value, torch.Tensor):
        return value.numel() * value.element_size()
    if isinstance(value, (list, tuple)):
        return sum(nbytes(v) for v in value)
    return 0


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default="smollm2-135m", choices=sorted(SHAPES))
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--out", default=None, help="write the figures to this JSON file")
    args = parser.parse_args(argv)

    torch.manual_seed(0)
    base = shape_model(args.shape, "cpu", args.tokens + 8, num_hidden_layers=2)
    model = FAMForCausalLM.from_base_model(base, block_size=1024, memory_segments=3, fam_length=64)
    enable_checkpointing(model)
    model.enable_input_require_grads()
    lora = get_peft_model(model, fam_lora_config(model, r=args.rank)).train()

    chains = []
    steps = FAMChain.steps

    def seen(self, *a, **k):
        chains.append(self)
        return steps(self, *a, **k)

    FAMChain.steps = seen
    try:
        ids = torch.randint(0, base.config.vocab_size, (1, args.tokens))
        out = lora(input_ids=ids, labels=ids, use_cache=False)
    finally:
        FAMChain.steps = steps
    chain = chains[0]
    saved_input = args.tokens * base.config.hidden_size * base.dtype.itemsize
    kept = {layer: nbytes(results) for layer, results in sorted(chain.recorded.items())}
    out.loss.backward()
    result = {"shape": args.shape, "tokens": args.tokens, "dtype": str(base.dtype), "block_size": 1024,
              "fam_length": 64, "layers_checked": len(kept), "kept_bytes_per_layer": kept,
              "checkpoint_input_bytes_per_layer": saved_input,
              "ratio": max(kept.values()) / saved_input if kept else None,
              "kept_after_backward": len(chain.recorded)}
    for layer, size in kept.items():
        print(f"{args.shape}, {args.tokens} tokens, layer {layer}: the chain keeps {size / 2**20:.2f} MiB until the "
              f"recompute, the checkpoint's input is {saved_input / 2**20:.2f} MiB ({size / saved_input:.1%})")
    print(f"kept after the backward: {len(chain.recorded)} layers")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
    return result


if __name__ == "__main__":
    main()
