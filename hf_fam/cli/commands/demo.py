"""`hf-fam demo`: train a tiny FAM model and its BSWA twin on passkey retrieval, on a CPU, in minutes."""

from __future__ import annotations

from ..formatting import HelpFormatter


def register(sub) -> None:
    from ...apps.demo.config import DemoConfig, full_config  # no torch: the defaults, stated once

    d, full = DemoConfig(), full_config()
    p = sub.add_parser(
        "demo",
        help="show the working memory: FAM vs block sliding window attention on passkey retrieval (CPU, ~15 min)",
        description="Train a tiny Llama with full attention on short passkey retrieval, then fine-tune it twice, "
        "with FAM and with block sliding window attention (same C, M, data and steps), side by side on two CPU "
        "cores; evaluate both at 1x-16x the attention window, overall and beyond the reach of the sliding window; "
        "print a table, write results.json, save the FAM model as a checkpoint with a card, and draw passkey.png.",
        formatter_class=HelpFormatter,
    )
    p.add_argument("--out", default="fam-demo", help="output folder")
    p.add_argument("--seed", type=int, nargs="+", default=[0],
                   help="seed(s); several seeds run one after the other and add a mean/spread summary")
    p.add_argument("--full", action="store_true",
                   help="the long run (~32 min on 2 cores): fine-tunes up to 16x the window, for memory that far back")
    p.add_argument("--steps", type=int,
                   help=f"fine-tuning steps per model (default {d.max_steps}, --full: {full.max_steps})")
    p.add_argument("--train-seconds", type=float, help=f"cap on fine-tuning time per model (default "
                   f"{d.train_seconds:g} s, --full: {full.train_seconds / 3600:g} h)")
    p.add_argument("--fam-length", type=int, help=f"F, FAM tokens per layer (default {d.fam_length})")
    p.add_argument("--trials", type=int, default=d.eval_trials, help="evaluation examples per length")
    p.add_argument("--pretrain-steps", type=int,
                   help=f"at most this many short-context steps (default {d.pretrain_steps})")
    p.add_argument("--eval-multiples", type=float, nargs="+", help="lengths to evaluate, in attention windows "
                   f"(default {' '.join(f'{m:g}' for m in d.eval_multiples)})")
    p.add_argument("--sequential", action="store_true", help="train the two models one after the other")
    p.add_argument("--no-plot", dest="plot", action="store_false",
                   help="skip passkey.png (it needs matplotlib: pip install 'hf-fam[demo]')")
    p.set_defaults(func=run, check=check)


def check(args) -> None:
    """Before minutes of training: is matplotlib there for the plot drawn at the end?"""
    import importlib.util

    from ..errors import CLIError

    if args.plot and importlib.util.find_spec("matplotlib") is None:
        raise CLIError("the demo draws passkey.png with matplotlib, which is not installed: "
                       "pip install 'hf-fam[demo]' (or pip install matplotlib), or pass --no-plot")


def run(args) -> int:
    from dataclasses import replace
    from pathlib import Path

    from ...apps.demo import DemoConfig, full_config, run_demo, summarize_seeds
    from ...evaluation import write_json

    all_results = []
    for seed in args.seed:
        config = full_config(seed) if args.full else DemoConfig(seed=seed)
        changes = {"eval_trials": args.trials}
        if args.steps is not None:
            changes["max_steps"] = args.steps
        if args.pretrain_steps is not None:
            changes["pretrain_steps"] = args.pretrain_steps
        if args.eval_multiples:
            changes["eval_multiples"] = tuple(args.eval_multiples)
        if args.train_seconds is not None:
            changes["train_seconds"] = args.train_seconds
        if args.fam_length is not None:
            changes["fam_length"] = args.fam_length
        config = replace(config, **changes)
        out = Path(args.out) / f"seed{seed}" if len(args.seed) > 1 else Path(args.out)
        all_results.append(run_demo(config, out, parallel=not args.sequential, plot=args.plot))
    if len(all_results) > 1:
        summary = summarize_seeds(all_results)
        write_json({"seeds": args.seed, "summary": summary}, Path(args.out) / "seeds_summary.json")
        print(format_seed_summary(summary, args.seed))
    return 0


def format_seed_summary(summary: dict, seeds) -> str:
    def cell(x):
        return "–" if x is None else f"{100 * x['mean']:.1f} ({100 * x['min']:.0f}–{100 * x['max']:.0f})"

    lines = [f"Mean (min–max) over seeds {list(seeds)}", "",
             "| × window | FAM all | BSWA all | FAM beyond reach | BSWA beyond reach |", "|---:|---:|---:|---:|---:|"]
    for f, b in zip(summary["FAM"], summary["BSWA"]):
        lines.append(f"| {f['window_multiple']:g} | {cell(f['accuracy'])} | {cell(b['accuracy'])} | "
                     f"{cell(f['beyond_reach_accuracy'])} | {cell(b['beyond_reach_accuracy'])} |")
    return "\n".join(lines)
