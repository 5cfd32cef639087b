"""Where a converted real model starts training: loss block by block, the memory's growth, its sensitivity.

`hf-fam finetune` switches a converted checkpoint from its zero-shot start to the paper's update and gives the
memory content slots (docs/training.md, "Where training starts the memory"). This measures, on one text, what
each start does block by block before any training:

- per-block loss (mean next-token NLL over each block of C tokens), against the base model with full attention;
- the norm of each layer's memory after every update (slot 0, and the median of the other slots);
- sensitivity: the largest logit change per block when every linear weight is perturbed by `--perturb` times its
  own standard deviation (the same noise for every start), which is how much a first training step can move it.

Starts (F slots, C, M as given):
- `sink`: the zero-shot start (`hf-fam convert`'s default): BOS memory, no update;
- `paper_bos`: the paper's update from the BOS memory;
- `paper_content`: the paper's update from slot 0 = BOS, slots 1..F-1 = the start text (what finetune trains);
- `paper_prefix`: the same slots, but each layer's initial memory is the base model's own hidden states of the
  tokens "BOS + start text" read as a prompt (given as `fam_state`), instead of the slots propagated with full
  attention among themselves: slot 0 is then exactly the attention sink.

Usage:
    python benchmarks/memory_drift.py --model /work/models/smollm2-135m-instruct \
        --out benchmarks/results/memory_drift.json
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

STARTS = ("sink", "paper_bos", "paper_content", "paper_prefix")
NORM_LAYERS = (0, 1, 2, 4, 8, 15, 22, 29)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="a base checkpoint folder (e.g. SmolLM2-135M-Instruct)")
    p.add_argument("--tokens", type=int, default=2048)
    p.add_argument("--block-size", type=int, default=256)
    p.add_argument("--memory-segments", type=int, default=1)
    p.add_argument("--fam-length", type=int, default=16)
    p.add_argument("--perturb", type=float, default=1e-3, help="noise per linear weight, times its std")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", type=Path, default=None, help="JSON file for the figures")
    return p.parse_args(argv)


def per_block(values: torch.Tensor, block: int) -> list[float]:
    return [round(values[s : s + block].mean().item(), 3) for s in range(0, values.shape[0], block)]


def build(args, start: str, tokenizer):
    """(model, fam_state or None) for one start; the model is loaded afresh (from_base_model shares modules)."""
    from transformers import AutoModelForCausalLM

    import hf_fam
    from hf_fam.checkpoint_io.fam_init import bos_fam_init, training_fam_init
    from hf_fam.training.options import DEFAULT_MEMORY_START_TEXT

    base = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).eval()
    F = args.fam_length
    fam_init = bos_fam_init(base, F)
    if start in ("paper_content", "paper_prefix"):
        fam_init = training_fam_init(fam_init, tokenizer, base.get_input_embeddings().weight, DEFAULT_MEMORY_START_TEXT)
    fam_state = None
    if start == "paper_prefix":  # the slots' rows (token embeddings, unscaled) read as a prompt
        scale = getattr(base.get_input_embeddings(), "embed_scale", 1.0)
        with torch.no_grad():
            hidden = base(inputs_embeds=(fam_init * scale)[None], output_hidden_states=True).hidden_states
        fam_state = list(hidden[: base.config.num_hidden_layers])  # the input of every layer
    model = hf_fam.FAMForCausalLM.from_base_model(
        base, block_size=args.block_size, memory_segments=args.memory_segments, fam_length=F, fam_init=fam_init,
        fam_update="sink" if start == "sink" else "paper").eval()
    return model, fam_state


def perturb(model, scale: float) -> None:
    """Every linear weight += scale * its std * N(0, 1), from a fixed seed (the same noise for every start)."""
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, module in sorted(model.named_modules(), key=lambda kv: kv[0]):
            if isinstance(module, torch.nn.Linear) and "lm_head" not in name:
                w = module.weight
                w.add_(torch.randn(w.shape, generator=generator) * w.std() * scale)


def memory_norms(model, ids, block: int, fam_state) -> list[dict]:
    """After each complete block: per layer in NORM_LAYERS, the norm of memory slot 0 and the median of the rest."""
    rows, cache = [], None
    with torch.no_grad():
        for b, s in enumerate(range(0, ids.shape[1], block)):
            kwargs = {"fam_state": fam_state} if b == 0 and fam_state is not None else {}
            cache = model(ids[:, s : s + block], cache=cache, use_cache=True, **kwargs).cache
            row = {}
            for layer in NORM_LAYERS:
                if layer < len(cache.layer_states):
                    norm = cache.layer_states[layer].fam[0].norm(dim=-1)
                    row[layer] = [round(norm[0].item(), 1), round(norm[1:].median().item(), 1)]
            rows.append(row)
    return rows


def main(argv=None) -> int:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from hf_fam.evaluation.texts import pydoc_text

    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    text_ids = tokenizer(pydoc_text(), add_special_tokens=False)["input_ids"][: args.tokens - 1]
    ids = torch.tensor([[tokenizer.bos_token_id, *text_ids]])
    C = args.block_size
    result = {"settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
              "machine": platform.processor() or platform.machine(), "starts": {}}

    def nll_and_logits(model, **kwargs):
        with torch.no_grad():
            logits = model(ids, **kwargs).logits[0]
        return torch.nn.functional.cross_entropy(logits[:-1].float(), ids[0, 1:], reduction="none"), logits

    t0 = time.time()
    base = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).eval()
    nll, logits = nll_and_logits(base)
    perturb(base, args.perturb)
    _, moved = nll_and_logits(base)
    result["base"] = {"block_loss": per_block(nll, C), "loss": round(nll.mean().item(), 3),
                      "logit_change": per_block((moved - logits).abs().amax(-1), C)}
    print(f"base (full attention): loss {result['base']['loss']}, by block {result['base']['block_loss']}")
    del base
    for start in STARTS:
        model, fam_state = build(args, start, tokenizer)
        kwargs = {"fam_state": fam_state} if fam_state is not None else {}
        nll, logits = nll_and_logits(model, **kwargs)
        norms = memory_norms(model, ids, C, fam_state)
        perturb(model, args.perturb)
        _, moved = nll_and_logits(model, **kwargs)
        entry = {"block_loss": per_block(nll, C), "loss": round(nll.mean().item(), 3), "memory_norms": norms,
                 "logit_change": per_block((moved - logits).abs().amax(-1), C)}
        result["starts"][start] = entry
        print(f"{start}: loss {entry['loss']}, by block {entry['block_loss']}")
        print(f"  logit change by block {entry['logit_change']}")
        for layer in (0, 4, 15):
            print(f"  layer {layer} memory norm (slot 0 / others) by update:",
                  " ".join(f"{r[layer][0]:.0f}/{r[layer][1]:.0f}" for r in norms if layer in r))
        del model
    result["seconds"] = round(time.time() - t0, 1)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
