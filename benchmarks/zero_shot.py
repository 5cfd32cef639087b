"""Zero-shot quality of a converted checkpoint: perplexity of long real text before any training.

Compares, on the same tokens of Python's own documentation (`pydoc_data.topics`, offline everywhere):
- base: the checkpoint with full attention (only up to its context length);
- BSWA: block sliding window attention, C and M as FAM's (FAM with F = 0);
- BSWA + sinks: the same window whose queries also see the first 4 tokens (StreamingLLM;
  `hf_fam.evaluation.sink_baseline`);
- FAM: `hf_fam.patch` with its defaults for fam_init and the FAM update (the default zero-shot start);
- FAM, paper start: the computation before the zero-shot start existed (random fam_init, the paper's update
  as docs/design.md §1 writes it), and any other variants asked for.

Each model reads the text once, `--max-tokens` long; perplexity "at length N" is over the first N tokens
(every model here is causal, so it equals an N-token run). The per-position curve (mean NLL in bins of
`--bin` tokens) goes to the plot. It also checks that an in-window chat prompt answers as the base model does.

Usage (SmolLM2-135M-Instruct converted from its GGUF, docs/gguf.md):
    python benchmarks/zero_shot.py --model /work/models/smollm2-135m-instruct --max-tokens 32768 \
        --out benchmarks/results/zero_shot.json
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

LENGTHS = [1024, 2048, 4096, 8192, 16384, 32768]


def token_nll(model, run, ids: torch.Tensor, chunk: int = 2048) -> torch.Tensor:
    """Per-token NLL (N-1,) of ids (1, N); the LM head is applied in chunks (no N x vocab logits)."""
    captured = {}
    decoder = model.model
    hook = decoder.norm.register_forward_hook(lambda m, a, out: captured.__setitem__("h", out))
    try:
        run(ids)
    finally:
        hook.remove()
    hidden = captured["h"][0]
    out = []
    for s in range(0, ids.shape[1] - 1, chunk):
        logits = model.lm_head(hidden[s : min(s + chunk, ids.shape[1] - 1)]).float()
        out.append(torch.nn.functional.cross_entropy(logits, ids[0, s + 1 : s + 1 + logits.shape[0]], reduction="none"))
    return torch.cat(out)


def summarise(nll: torch.Tensor, lengths: list[int], bin_size: int) -> dict:
    n = nll.shape[0] + 1
    at = {str(L): math.exp(nll[: L - 1].mean().item()) for L in lengths if L <= n}
    bins = [{"start": s, "end": min(s + bin_size, n), "nll": nll[max(s - 1, 0) : s + bin_size - 1].mean().item()}
            for s in range(0, n - 1, bin_size)]
    return {"tokens": n, "perplexity_at_length": at, "bins": bins}


def answer(model, tokenizer, generate) -> str:
    chat = [{"role": "user", "content": "What is the capital of France?"}]
    enc = tokenizer.apply_chat_template(chat, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    out = generate(**enc, max_new_tokens=16, do_sample=False)
    return tokenizer.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="a plain (base) checkpoint folder")
    p.add_argument("--block-size", type=int, default=128)
    p.add_argument("--memory-segments", type=int, default=1)
    p.add_argument("--fam-length", type=int, default=16)
    p.add_argument("--max-tokens", type=int, default=8192)
    p.add_argument("--base-max-tokens", type=int, default=8192, help="full attention only up to this length")
    p.add_argument("--variants", default="base,bswa,sinks,fam,fam_paper",
                   help="comma-separated: base, bswa, sinks, fam (defaults), fam_paper (random fam_init, paper "
                   "update), or fam:INIT:UPDATE (INIT in random|bos, UPDATE in paper|sink)")
    p.add_argument("--max-tokens-for", action="append", default=[], metavar="VARIANT=N",
                   help="read only N tokens with this variant (e.g. fam_paper=8192: it has diverged long before)")
    p.add_argument("--bin", type=int, default=512)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default="benchmarks/results/zero_shot.json")
    p.add_argument("--plot", help="PNG path (default: next to --out)")
    p.add_argument("--no-answer", action="store_true", help="skip the in-window chat check")
    p.add_argument("--report", metavar="JSON", help="only write the table (.md) and plot of an existing result")
    args = p.parse_args(argv)
    if args.report:
        result = json.loads(Path(args.report).read_text())
        Path(args.report).with_suffix(".md").write_text(markdown_table(result))
        plot_result(result, Path(args.report).with_suffix(".png"))
        print(markdown_table(result))
        return 0
    torch.set_num_threads(args.threads)

    from transformers import AutoModelForCausalLM, AutoTokenizer

    import hf_fam
    from hf_fam.evaluation.sink_baseline import sink_attention
    from hf_fam.evaluation.texts import pydoc_text

    tokenizer = AutoTokenizer.from_pretrained(args.model)
    base = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).eval()
    body = tokenizer(pydoc_text(), add_special_tokens=False)["input_ids"]
    first = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    all_ids = torch.tensor([first + body[: args.max_tokens - len(first)]])
    C, M, F = args.block_size, args.memory_segments, args.fam_length
    limits = {k: int(v) for k, v in (item.split("=") for item in args.max_tokens_for)}
    result = {"model": Path(args.model).name, "text": "pydoc_data.topics (sorted topics, BOS first)",
              "block_size": C, "memory_segments": M, "fam_length": F, "sinks": 4, "dtype": "float32",
              "threads": args.threads, "torch": torch.__version__, "machine": platform.machine(),
              "lengths": [L for L in LENGTHS if L <= args.max_tokens], "models": {}}
    out_path = Path(args.out)

    def fam_model(variant: str):
        kwargs = {}
        if variant == "fam_paper":
            kwargs = {"fam_init": "random", "fam_update": "paper"}
        elif variant.startswith("fam:"):
            _, init, update = variant.split(":")
            kwargs = {"fam_init": init, "fam_update": update}
        torch.manual_seed(0)  # the random fam_init of fam_paper
        return hf_fam.patch(base, block_size=C, memory_segments=M, fam_length=0 if variant == "bswa" else F, **kwargs)

    with torch.no_grad():
        for variant in args.variants.split(","):
            n = min(limits.get(variant, args.max_tokens), args.base_max_tokens if variant == "base" else 10**9)
            ids = all_ids[:, :n]
            start = time.perf_counter()
            if variant == "base":
                nll = token_nll(base, lambda x: base(x, use_cache=False, logits_to_keep=1), ids)
            elif variant == "sinks":
                with sink_attention(base, block_size=C, memory_segments=M, sinks=4) as run:
                    nll = token_nll(base, lambda x: run(x, logits_to_keep=1), ids)
            else:
                model = fam_model(variant)
                nll = token_nll(model, lambda x: model(x, use_cache=False, logits_to_keep=1), ids)
            entry = summarise(nll, result["lengths"], args.bin)
            entry["seconds"] = round(time.perf_counter() - start, 1)
            if variant not in ("bswa", "sinks") and not args.no_answer:
                if variant == "base":
                    entry["answer"] = answer(base, tokenizer, base.generate)
                else:
                    entry["answer"] = answer(model, tokenizer, model.generate)
            if hasattr(base, "fam_settings"):
                hf_fam.unpatch(base)
            result["models"][variant] = entry
            shown = " ".join(f"{k}:{v:.2f}" for k, v in entry["perplexity_at_length"].items())
            print(f"{variant:24s} {shown}  ({entry['seconds']} s) {entry.get('answer', '')!r}", flush=True)
            out_path.parent.mkdir(parents=True, exist_ok=True)
            out_path.write_text(json.dumps(result, indent=2) + "\n")  # after every model: partial results survive
    plot = Path(args.plot) if args.plot else out_path.with_suffix(".png")
    plot_result(result, plot)
    out_path.with_suffix(".md").write_text(markdown_table(result))
    print(f"wrote {out_path} and {plot}")
    return 0


LABELS = {"base": "base (full attention)", "bswa": "BSWA", "sinks": "BSWA + 4 sinks (StreamingLLM)",
          "fam": "FAM, default start", "fam_paper": "FAM, random fam_init + paper update"}


def markdown_table(result: dict) -> str:
    """Perplexity over the first N tokens, one row per N, one column per model, and FAM's ratios."""
    models = result["models"]
    names = [n for n in ("fam", "fam_paper", "bswa", "sinks", "base") if n in models]
    names += [n for n in models if n not in names]
    head = "| tokens | " + " | ".join(LABELS.get(n, n) for n in names) + " | FAM / sinks | FAM / BSWA |"
    lines = [head, "|---:|" + "---:|" * (len(names) + 2)]
    for L in result["lengths"]:
        cells = []
        for n in names:
            value = models[n]["perplexity_at_length"].get(str(L))
            cells.append("—" if value is None else f"{value:,.2f}")
        ratio = []
        for other in ("sinks", "bswa"):
            a = models.get("fam", {}).get("perplexity_at_length", {}).get(str(L))
            b = models.get(other, {}).get("perplexity_at_length", {}).get(str(L))
            ratio.append("—" if a is None or b is None else f"{a / b:.3f}")
        lines.append(f"| {L:,} | " + " | ".join(cells + ratio) + " |")
    answers = [f"- {LABELS.get(n, n)}: {models[n]['answer']!r}" for n in names if "answer" in models[n]]
    return "\n".join(lines) + ("\n\nIn-window chat answer (greedy):\n" + "\n".join(answers) if answers else "") + "\n"


def _merged_bins(bins: list[dict], width: int) -> tuple[list[float], list[float]]:
    """(bin middles, mean NLL) over bins of `width` tokens, merged from the stored ones (token-weighted)."""
    groups: dict[int, list[float]] = {}
    for b in bins:
        acc = groups.setdefault(b["start"] // width, [0.0, 0])
        n = b["end"] - b["start"]
        acc[0] += b["nll"] * n
        acc[1] += n
    keys = sorted(groups)
    return [k * width + groups[k][1] / 2 for k in keys], [groups[k][0] / groups[k][1] for k in keys]


def plot_result(result: dict, path: Path, width: int = 1024) -> Path:
    """Perplexity per `width`-token range against position (top) and relative to BSWA + sinks (bottom)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, ax2) = plt.subplots(2, 1, figsize=(7.5, 6.0), dpi=120, sharex=True, height_ratios=[2, 1])
    curves = {name: _merged_bins(entry["bins"], width) for name, entry in result["models"].items()}
    for i, (name, (xs, nll)) in enumerate(curves.items()):
        ax.plot(xs, [math.exp(v) for v in nll], color=f"C{i}", label=LABELS.get(name, name), lw=1.3)
        if "sinks" in curves and name != "sinks":
            ref = dict(zip(*curves["sinks"]))
            pts = [(x, math.exp(v - ref[x])) for x, v in zip(xs, nll) if x in ref]
            ax2.plot([x for x, _ in pts], [r for _, r in pts], color=f"C{i}", lw=1.3)
    ax.set_yscale("log")
    ax.set_ylabel(f"perplexity per {width}-token range")
    ax.set_title(f"{result['model']}, zero-shot, fp32: C={result['block_size']} M={result['memory_segments']} "
                 f"F={result['fam_length']}, text: Python docs", fontsize=10)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    ax2.axhline(1.0, color="k", lw=0.8)
    ax2.axhline(1.1, color="k", lw=0.8, ls=":")
    ax2.set_yscale("log")
    ax2.set_ylabel("÷ BSWA + 4 sinks")
    ax2.set_xlabel("token position")
    ax2.grid(alpha=0.3, which="both")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


if __name__ == "__main__":
    raise SystemExit(main())
