"""`hf-fam eval`: passkey retrieval (overall and beyond reach) or streamed perplexity, as JSON and a plot."""

from __future__ import annotations

from ..fam_args import add_fam_arguments, add_options, add_quantize_argument, options_from_args
from ..formatting import HelpFormatter


def register(sub) -> None:
    from ...evaluation.options import PasskeyEvalConfig

    p = sub.add_parser(
        "eval",
        help="evaluate passkey retrieval or long-text perplexity; writes JSON (and a PNG plot)",
        description="Evaluate a FAM checkpoint (or a base checkpoint, as is or with FAM settings) on passkey "
        "retrieval at several lengths, overall and beyond the reach of block sliding window attention, or on "
        "the perplexity of a long text read by streaming. The JSON's 'results' feed `hf-fam card --eval-results`.",
        formatter_class=HelpFormatter,
    )
    p.add_argument("model", help="FAM or base checkpoint, or a LoRA adapter of a FAM checkpoint (hf-fam finetune's "
                   "output, merged into its base to evaluate): a folder or Hub id")
    p.add_argument("--task", choices=("passkey", "perplexity"), default="passkey", help="what to evaluate")
    p.add_argument("--out", default="eval.json", help="JSON output path")
    p.add_argument("--plot", help="PNG plot path (passkey, or perplexity with --compare); default: next to --out")
    p.add_argument("--no-plot", action="store_true", help="write the JSON only (no matplotlib needed)")
    p.add_argument("--compare", nargs="+", choices=("base", "bswa", "fam"), metavar="VARIANT",
                   help="perplexity: also read the text with the same weights as BSWA (no memory) and/or the base "
                   "model (full attention), and plot perplexity against position for all of them, e.g. "
                   "--compare base bswa fam")
    p.add_argument("--lengths", type=int, nargs="+", help="passkey: sequence lengths in tokens")
    p.add_argument("--window-multiples", type=float, nargs="+",
                   help="passkey: lengths as multiples of the attention window C*(M+1) (FAM models)")
    p.add_argument("--text-file", help="perplexity: the text to read")
    p.add_argument("--max-tokens", type=int, help="perplexity: stop after this many tokens")
    add_options(p, PasskeyEvalConfig)  # --trials, --depth, --form, --vocab-offset, --seed, --batch-size, --chunk-tokens
    p.add_argument("--no-fam", action="store_true", help="evaluate a base checkpoint as is (full attention)")
    add_fam_arguments(p, base_only=True)
    p.add_argument("--label", help="name of this model in the JSON and the plot")
    p.add_argument("--dtype", default="auto", help="auto, float32, bfloat16 or float16")
    p.add_argument("--device", default="cpu", help="cpu, cuda, ...")
    add_quantize_argument(p)
    p.set_defaults(func=run, check=check)


def check(args) -> None:
    """Before the evaluation: is matplotlib there for the plot drawn at the end (passkey, or --compare)?"""
    import importlib.util

    from ..errors import CLIError

    if args.no_plot and args.plot:
        raise CLIError("--plot names the plot that --no-plot skips: pass one of them")
    plots = (args.task == "passkey" or bool(args.compare)) and not args.no_plot
    if plots and importlib.util.find_spec("matplotlib") is None:
        raise CLIError("hf-fam eval draws its plot with matplotlib, which is not installed: "
                       "pip install 'hf-fam[demo]' (or pip install matplotlib), or pass --no-plot")


def run(args) -> int:
    from pathlib import Path

    from ...evaluation import (
        PasskeyEvalConfig,
        evaluate_passkey,
        evaluate_perplexity,
        plot_passkey,
        reach_of,
        write_json,
    )
    from ...runtime.loading import FAMOverrides, load_fam_model, resolve_dtype
    from ..errors import CLIError

    if args.no_fam:
        from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

        from ...runtime.quantize import loading_kwargs

        dtype = resolve_dtype(args.dtype)
        quantized = loading_kwargs(args.quantize, dtype, AutoConfig.from_pretrained(args.model),
                                   args.device) if args.quantize else {}
        model = AutoModelForCausalLM.from_pretrained(args.model, dtype=dtype, **quantized)
        model = model if quantized else model.to(args.device)
        if getattr(model.config, "model_type", None) == "fam":  # a FAM checkpoint, or an adapter of one, loads so
            raise CLIError(f"--no-fam reads a base checkpoint as is, and {args.model} loads as a FAM model (it would "
                           "run FAM under a no-FAM label); for its weights with full attention use --task "
                           "perplexity --compare base fam")
        tokenizer = AutoTokenizer.from_pretrained(args.model)
    else:
        overrides = FAMOverrides.from_args(args)
        model, tokenizer = load_fam_model(args.model, overrides=overrides, dtype=args.dtype, device=args.device,
                                          adapters=True, quantize=args.quantize)
    label = args.label or Path(args.model.rstrip("/")).name

    if args.task == "perplexity":
        if not args.text_file:
            raise CLIError("--task perplexity needs --text-file")
        if not Path(args.text_file).is_file():
            raise CLIError(f"text file not found: {args.text_file}")
        if tokenizer is None:
            raise CLIError(f"{args.model} has no tokenizer files")
        from ...runtime.streaming import iter_text_file_tokens

        if args.compare:
            from ...evaluation import compare_perplexity, plot_perplexity

            runs = compare_perplexity(
                model, lambda: iter_text_file_tokens(tokenizer, args.text_file, chunk_tokens=args.chunk_tokens),
                variants=args.compare, max_tokens=args.max_tokens, progress=True)
            s = model.fam_settings
            names = {"base": "base (full attention)", "bswa": f"BSWA C={s.block_size} M={s.memory_segments}",
                     "fam": f"FAM C={s.block_size} M={s.memory_segments} F={s.fam_length}"}
            result = {"label": label, "models": {names[k]: v for k, v in runs.items()}}
            write_json(result, args.out)
            plot = None if args.no_plot else args.plot or str(Path(args.out).with_suffix(".png"))
            if plot:
                plot_perplexity(result["models"], plot, title=f"{label}: perplexity by position")
            for name, run in result["models"].items():
                print(f"{name}: perplexity {run['perplexity']:.3f} over {run['tokens']} tokens")
            print(f"wrote {args.out}" + (f" and {plot}" if plot else ""))
            return 0
        chunks = iter_text_file_tokens(tokenizer, args.text_file, chunk_tokens=args.chunk_tokens)
        result = {"label": label, **evaluate_perplexity(model, chunks, max_tokens=args.max_tokens, progress=True)}
        write_json(result, args.out)
        print(f"{label}: perplexity {result['perplexity']:.3f} over {result['tokens']} tokens -> {args.out}")
        return 0

    reach = reach_of(model)
    if args.window_multiples:
        if reach is None:
            raise CLIError("--window-multiples needs a FAM model (the window is C*(M+1)); use --lengths")
        lengths = [int(round(m * reach["window"])) for m in args.window_multiples]
    else:
        lengths = args.lengths or PasskeyEvalConfig().lengths
    if args.form == "text" and tokenizer is None:
        raise CLIError(f"{args.model} has no tokenizer: use --form synthetic")
    config = options_from_args(PasskeyEvalConfig, args, lengths=lengths)
    result = evaluate_passkey(model, config, tokenizer, progress=True, label=label)
    write_json(result, args.out)
    plot = None if args.no_plot else args.plot or str(Path(args.out).with_suffix(".png"))
    if plot:
        plot_passkey([result], plot)
    for row in result["rows"]:
        far = row.get("beyond_reach_accuracy")
        far_text = f", beyond reach {100 * far:.1f}% of {row['beyond_reach_trials']}" if far is not None else ""
        print(f"{label}: {row['length']} tokens: {100 * row['accuracy']:.1f}%{far_text}")
    print(f"wrote {args.out}" + (f" and {plot}" if plot else ""))
    return 0
