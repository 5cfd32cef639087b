"""Fine-tuning a real checkpoint shows the memory: FAM against BSWA, same data, steps and budget.

One command, on SmolLM2-135M-Instruct (README "A real model, end to end" says how to get it offline):

    python benchmarks/real_finetune.py --model /work/models/smollm2-135m-instruct \
        --out benchmarks/results/real_finetune

For each of FAM and BSWA (the same C and M = 0, F = 0 for BSWA), it converts the base checkpoint with the
paper's update, runs `hf_fam.training.finetune` (LoRA + fam_init, passkey in the paper's text form with
natural-language filler, key at a random depth; with `--data mix`, the default, half the sequences are Python's
standard-library sources instead, so that the model stays a language model), then evaluates both:

- passkey retrieval at multiples of the attention window (default 4x, 8x, 16x), overall and for keys beyond
  BSWA's reach (with M = 0 a block sees nothing before itself, so every key in an earlier block is beyond
  reach); the base model with full attention reads the same prompts as the reference;
- perplexity of Python's documentation (`pydoc_data.topics`, not trained on), read by streaming, per position
  range up to `--ppl-tokens`, for FAM, BSWA and the base model (within its context).

It writes `OUT.json` (settings, training logs, every figure, seconds per phase), `OUT.md` and `OUT.png`;
partial results are written after every phase. Weights are not kept (`--keep` keeps them).
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def stdlib_sources(folder: Path, max_chars: int) -> Path:
    """Python's standard-library sources (sorted by name, up to `max_chars` characters) as .txt documents in
    `folder`: real text available offline, and not the pydoc topics the perplexity is measured on."""
    import sysconfig

    folder.mkdir(parents=True, exist_ok=True)
    total = 0
    for path in sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py")):
        text = path.read_text(encoding="utf-8", errors="replace")
        if total + len(text) > max_chars:
            break
        (folder / f"{path.stem}.txt").write_text(text)
        total += len(text)
    return folder


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="base checkpoint folder, or a GGUF file (e.g. "
                   "SmolLM2-135M-Instruct.Q4_1.gguf), dequantised to float32")
    p.add_argument("--out", default="benchmarks/results/real_finetune", help="output path stem")
    p.add_argument("--block-size", type=int, default=32)
    p.add_argument("--fam-length", type=int, default=16)
    p.add_argument("--fam-init", default="bos", help="fam_init of the FAM model: bos, random, text:TEXT")
    p.add_argument("--steps", type=int, default=500)
    p.add_argument("--batch-size", type=int, default=2)
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--warmup-steps", type=int, default=20)
    p.add_argument("--lora-rank", type=int, default=32)
    p.add_argument("--train", choices=("lora", "pissa", "full"), default="lora",
                   help="LoRA + norms from PEFT's start, from PiSSA's (--lora-init pissa), or every weight (--full; "
                   "use a lower --lr, the memory probe's 5e-5): docs/training.md")
    p.add_argument("--seq-len", type=int, default=160, help="longest training example (tokens)")
    p.add_argument("--min-seq-len", type=int, default=80, help="shortest training example (tokens)")
    p.add_argument("--data", choices=("passkey", "mix"), default="mix",
                   help="passkey only, or passkey mixed with Python's standard-library sources")
    p.add_argument("--text-fraction", type=float, default=0.5, help="with --data mix: share of text sequences")
    p.add_argument("--text-chars", type=int, default=2_000_000, help="with --data mix: characters of source text")
    p.add_argument("--state-passing-prob", type=float, default=0.99,
                   help="Random State Passing for FAM: training sequences are 5 blocks, the text read later 512; a "
                   "memory passed on from forward to forward (about 100 in a row at 0.99) is trained for that horizon")
    p.add_argument("--position-offset-prob", type=float, default=0.0)
    p.add_argument("--window-multiples", type=int, nargs="+", default=[4, 8, 16])
    p.add_argument("--trials", type=int, default=40)
    p.add_argument("--ppl-tokens", type=int, default=16384)
    p.add_argument("--base-max-tokens", type=int, default=8192, help="full attention only within its context")
    p.add_argument("--variants", default="fam,bswa,base", help="comma-separated: fam and bswa (fine-tuned), base "
                   "(full attention), zero_shot (FAM converted with hf-fam convert's defaults, not trained)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--device", default="cpu", help="cpu, or cuda for a longer run on a GPU (report it labelled)")
    p.add_argument("--keep", metavar="DIR", help="keep the converted and fine-tuned checkpoints here")
    p.add_argument("--report", metavar="JSON", help="only write the table and plot of an existing result")
    return p.parse_args(argv)


def train_variant(args, variant: str, work: Path) -> dict:
    """Convert and fine-tune one variant; return its training summary and the merged model."""
    from hf_fam.checkpoint_io.convert import ConvertOptions, convert
    from hf_fam.training.finetune import DataOptions, FinetuneConfig, LoraOptions, ModelOptions, TrainOptions, finetune
    from hf_fam.training.recipe import FAMRecipeConfig

    F = args.fam_length if variant == "fam" else 0
    text, passkey_share = {}, 1.0
    if args.data == "mix":  # the sources are written once, by main()
        text = {"text_files": (str(work / "text"),), "text_fraction": args.text_fraction}
        passkey_share = 1 - args.text_fraction
    converted = work / f"{variant}_converted"
    convert(args.model, converted, ConvertOptions(block_size=args.block_size, memory_segments=0, fam_length=F,
                                                  fam_init=args.fam_init if F else "bos", fam_update="paper",
                                                  seed=args.seed, progress=False))
    config = FinetuneConfig(
        model=ModelOptions(path=str(converted)),
        data=DataOptions(source=args.data, seq_len=args.seq_len, passkey_min_seq_len=args.min_seq_len,
                         passkey_examples=round(args.steps * args.batch_size * passkey_share), passkey_form="text",
                         **text),
        lora=LoraOptions(full=True) if args.train == "full" else LoraOptions(
            r=args.lora_rank, init="pissa" if args.train == "pissa" else "peft"),
        recipe=FAMRecipeConfig(state_passing_prob=args.state_passing_prob if F else 0.0,
                               position_offset_prob=args.position_offset_prob, seed=args.seed),
        train=TrainOptions(output_dir=str(work / f"{variant}_tuned"), max_steps=args.steps, batch_size=args.batch_size,
                           learning_rate=args.lr, warmup_steps=args.warmup_steps, seed=args.seed, log_every=10,
                           merge=args.train != "full", cpu=args.device == "cpu"),
    )
    result = finetune(config)
    log = [json.loads(line) for line in (Path(config.train.output_dir) / "train_log.jsonl").read_text().splitlines()]
    return {"steps": result.steps, "final_loss": result.final_loss, "seconds": round(result.seconds, 1),
            "log": log}, result.model


def zero_shot_model(args, work: Path):
    """The FAM model a user gets from `hf-fam convert` with only C, M = 0 and F given (the zero-shot start)."""
    from hf_fam.checkpoint_io.convert import ConvertOptions, convert
    from hf_fam.runtime.loading import load_fam_model

    folder = work / "zero_shot_converted"
    convert(args.model, folder, ConvertOptions(block_size=args.block_size, memory_segments=0,
                                               fam_length=args.fam_length, seed=args.seed, progress=False))
    return load_fam_model(str(folder), dtype="float32")[0]


def evaluate(args, name: str, model, tokenizer, reach: dict) -> dict:
    from hf_fam.evaluation.evaluate import PasskeyEvalConfig, evaluate_passkey, evaluate_perplexity
    from hf_fam.evaluation.texts import pydoc_text

    window = args.block_size  # M = 0: the window is one block
    start = time.perf_counter()
    lengths = [m * window for m in args.window_multiples]
    passkey = evaluate_passkey(model, PasskeyEvalConfig(lengths=lengths, trials=args.trials, form="text", seed=1234,
                                                        batch_size=8), tokenizer, reach=reach, label=name)
    t_passkey = time.perf_counter() - start
    ids = tokenizer(pydoc_text(), add_special_tokens=False)["input_ids"]
    first = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    limit = args.base_max_tokens if name == "base" else args.ppl_tokens
    stream = first + ids[: limit - len(first)]
    start = time.perf_counter()
    with torch.no_grad():
        ppl = evaluate_perplexity(model, [stream[s : s + 4096] for s in range(0, len(stream), 4096)])
    return {"passkey": passkey["rows"], "perplexity": ppl["by_position"], "perplexity_all": ppl["perplexity"],
            "seconds": {"passkey": round(t_passkey, 1), "perplexity": round(time.perf_counter() - start, 1)}}


def main(argv=None) -> int:
    args = parse(argv)
    out = Path(args.out)
    if args.report:
        result = json.loads(Path(args.report).read_text())
        write_report(result, out)
        return 0
    torch.set_num_threads(args.threads)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    started = time.perf_counter()
    work = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="real_finetune_"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        name, source = Path(args.model).name, args.model
        if Path(args.model).suffix == ".gguf":  # a GGUF file: dequantised once into a plain checkpoint
            from hf_fam.checkpoint_io.gguf_source import dequantise

            (work / "base").mkdir(exist_ok=True)
            args.model = str(dequantise(Path(args.model), torch.float32, work / "base"))
        tokenizer = AutoTokenizer.from_pretrained(args.model)
        if args.data == "mix":
            stdlib_sources(work / "text", args.text_chars)
        settings = {k: v for k, v in vars(args).items() if k != "report"} | {"model": source}
        result = {"model": name, "settings": settings,
                  "machine": {"platform": platform.platform(), "threads": args.threads, "torch": torch.__version__,
                              "device": device_name(args.device)},
                  "train": {}, "eval": {}}
        reach = {"block_size": args.block_size, "memory_segments": 0, "num_layers": None, "window": args.block_size}
        base = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).eval()
        reach["num_layers"] = base.config.num_hidden_layers
        del base
        for variant in args.variants.split(","):
            if variant == "base":
                print("== base (full attention): evaluate", flush=True)
                model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
            elif variant == "zero_shot":
                print("== zero_shot: convert (hf-fam convert's defaults), no training", flush=True)
                model = zero_shot_model(args, work)
            else:
                print(f"== {variant}: convert and fine-tune", flush=True)
                result["train"][variant], model = train_variant(args, variant, work)
                print(f"== {variant}: evaluate", flush=True)
            result["eval"][variant] = evaluate(args, variant, model.to(args.device).eval(), tokenizer, reach)
            del model
            save(result, out, started)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    write_report(result, out)
    return 0


def device_name(device: str) -> str:
    if device.startswith("cuda") and torch.cuda.is_available():
        return f"{device} ({torch.cuda.get_device_name(torch.device(device))})"
    return device


def save(result: dict, out: Path, started: float) -> None:
    result["total_seconds"] = round(time.perf_counter() - started, 1)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")


LABELS = {"fam": "FAM", "bswa": "BSWA", "base": "base (full attention)", "zero_shot": "FAM, zero-shot"}


def markdown(result: dict) -> str:
    s = result["settings"]
    where = (f"{s['threads']} CPU threads" if s.get("device", "cpu") == "cpu"
             else result["machine"]["device"])
    passing = (f", Random State Passing p={s['state_passing_prob']:g} (FAM)" if s.get("state_passing_prob") else "")
    mix = (f" mixed with standard-library sources ({100 * s['text_fraction']:.0f} % of the sequences)"
           if s.get("data", "passkey") == "mix" else "")
    trained = {"full": "every weight", "pissa": f"LoRA r={s['lora_rank']} from PiSSA's start"}.get(
        s.get("train", "lora"), f"LoRA r={s['lora_rank']}")
    lines = [f"{result['model']}, C={s['block_size']}, M=0, F={s['fam_length']} (BSWA: F=0); {s['steps']} steps of "
             f"batch {s['batch_size']}, passkey {s['min_seq_len']}-{s['seq_len']} tokens{mix}, {trained}, "
             f"lr {s['lr']}{passing}; {where}; total {result.get('total_seconds', 0) / 60:.1f} min", ""]
    if not result["train"]:  # nothing fine-tuned: the training settings above do not apply
        lines[0] = (f"{result['model']}, C={s['block_size']}, M=0, F={s['fam_length']}; not fine-tuned; {where}; "
                    f"total {result.get('total_seconds', 0) / 60:.1f} min")
    names = [n for n in LABELS if n in result["eval"]]
    lines += ["| passkey, tokens (x window) | " + " | ".join(
        f"{LABELS[n]} all | {LABELS[n]} beyond reach" for n in names) + " |",
        "|---|" + "---:|---:|" * len(names)]
    rows = result["eval"][names[0]]["passkey"]
    for i, row in enumerate(rows):
        cells = []
        for n in names:
            r = result["eval"][n]["passkey"][i]
            far = r.get("beyond_reach_accuracy")
            cells += [f"{100 * r['accuracy']:.0f} %", "–" if far is None else
                      f"{100 * far:.0f} % ({r['beyond_reach_trials']})"]
        lines.append(f"| {row['length']} ({row['window_multiple']:g}x) | " + " | ".join(cells) + " |")
    lines += ["", "| perplexity, positions | " + " | ".join(LABELS[n] for n in names) + " |",
              "|---|" + "---:|" * len(names)]
    spans = [(b["start"], b["end"]) for b in max((result["eval"][n]["perplexity"] for n in names), key=len)]
    for lo, hi in spans:
        cells = []
        for n in names:
            b = next((b for b in result["eval"][n]["perplexity"] if b["start"] == lo), None)
            cells.append("–" if b is None else f"{b['perplexity']:.2f}")
        lines.append(f"| {lo}-{hi} | " + " | ".join(cells) + " |")
    train = result["train"]
    lines += [""] + [f"- {LABELS[n]}: {t['steps']} steps in {t['seconds'] / 60:.1f} min, final loss "
                     f"{t['final_loss']:.3f}" for n, t in train.items()]
    return "\n".join(lines) + "\n"


def write_report(result: dict, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.with_suffix(".md").write_text(markdown(result))
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4), dpi=110)
    for n, style in (("fam", "^-"), ("bswa", "s--"), ("base", "o:"), ("zero_shot", "v-.")):
        if n not in result["eval"]:
            continue
        e = result["eval"][n]
        a.plot([r["length"] for r in e["passkey"]],
               [100 * (r["beyond_reach_accuracy"] or 0) for r in e["passkey"]], style, label=LABELS[n])
        b.plot([(p["start"] + p["end"]) / 2 for p in e["perplexity"]], [p["perplexity"] for p in e["perplexity"]],
               style, label=LABELS[n])
    a.set(xscale="log", xlabel="passkey prompt length (tokens)", ylabel="accuracy, keys beyond BSWA's reach (%)",
          ylim=(-2, 102))
    b.set(xscale="log", yscale="log", xlabel="position in the text (tokens)", ylabel="perplexity")
    for ax in (a, b):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(f"{result['model']} fine-tuned: FAM vs BSWA (C={result['settings']['block_size']}, M=0)")
    fig.tight_layout()
    fig.savefig(out.with_suffix(".png"))
    plt.close(fig)
    print(markdown(result))


if __name__ == "__main__":
    sys.exit(main())
