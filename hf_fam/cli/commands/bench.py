"""`hf-fam bench`: the performance suite (prefill, training step, decode, 1M-token stream)."""

from __future__ import annotations

from ...runtime import cpu_memory
from ..formatting import HelpFormatter


def register(sub) -> None:
    from ...apps.bench import BenchConfig
    from ...apps.bench_real import PRESETS

    d = BenchConfig()
    p = sub.add_parser(
        "bench",
        help="benchmark FAM against BSWA and full attention (prefill, training, decode, streaming memory)",
        description="Measure prefill time and peak memory vs N, a training step, decode latency vs context and a "
        "1M-token stream's peak memory, for full attention, BSWA (F=0) and FAM on a small Llama; interleaved "
        "rounds, medians of ratios; writes JSON, a markdown table and PNG plots.",
        formatter_class=HelpFormatter,
    )
    p.add_argument("--out", default=None, help="output path stem (.json, .md, _*.png); default "
                   "benchmarks/results/suite, or benchmarks/results/<preset>")
    p.add_argument("--preset", choices=list(PRESETS), default=None,
                   help="measure at a real model's shape instead of the small Llama (random weights, C=1024, M=3, "
                        "F=64): smollm2-135m-cpu (fp32, CPU: the regression benchmark) or llama-3.2-1b-gpu (bf16, "
                        "CUDA); prefill at batch 1 and 8 in chunks of 8 blocks and in one forward, a LoRA training "
                        "step, decode. Options given here replace the preset's")
    p.add_argument("--batches", type=int, nargs="+", default=None, metavar="B",
                   help="preset prefill: batch sizes (default: the preset's, 1 and 8)")
    p.add_argument("--train-lengths", type=int, nargs="+", default=None, metavar="N",
                   help="preset train: tokens per LoRA training step (default: the preset's, 8k to 64k)")
    p.add_argument("--lora-rank", type=int, default=None, help="preset train: LoRA rank (default: the preset's, 64)")
    p.add_argument("--warmup-tokens", type=int, default=None, metavar="N",
                   help="preset on the CPU: longer inputs warm up on their first N tokens (default: the preset's, "
                        "16384)")
    p.add_argument("--parts", nargs="+", default=d.parts, choices=["prefill", "train", "decode", "stream"],
                   help="what to measure")
    p.add_argument("--prefill-lengths", type=int, nargs="+", default=d.prefill_lengths, metavar="N",
                   help="prefill: input lengths in tokens")
    p.add_argument("--full-max-length", type=int, default=d.full_max_length,
                   help="prefill: longest N run with full attention (its memory grows with N)")
    p.add_argument("--decode-contexts", type=int, nargs="+", default=d.decode_contexts, metavar="N",
                   help="decode: context lengths (tokens read) before the timed tokens")
    p.add_argument("--decode-steps", type=int, default=d.decode_steps, help="decode: tokens generated per timing")
    p.add_argument("--stream-tokens", type=int, default=d.stream_tokens, help="stream: tokens FAM reads")
    p.add_argument("--train-length", type=int, default=d.train_length, help="train: tokens per sequence")
    p.add_argument("--train-batch", type=int, default=d.train_batch, help="train: sequences per step")
    p.add_argument("--rounds", type=int, default=d.rounds, help="timed rounds after the warm-up")
    p.add_argument("--chunk", type=int, default=d.chunk,
                   help="tokens per forward when FAM/BSWA read through the cache (0: one forward)")
    p.add_argument("--hidden", type=int, default=d.hidden, help="model: hidden size of the Llama measured")
    p.add_argument("--layers", type=int, default=d.layers, help="model: decoder layers")
    p.add_argument("--heads", type=int, default=d.heads, help="model: attention heads")
    p.add_argument("--vocab", type=int, default=d.vocab, help="model: vocabulary size")
    p.add_argument("--block-size", type=int, default=d.block_size, help="C, tokens per block (FAM and BSWA)")
    p.add_argument("--memory-segments", type=int, default=d.memory_segments,
                   help="M, previous blocks each block attends to (FAM and BSWA)")
    p.add_argument("--fam-length", type=int, default=d.fam_length, help="F, FAM tokens per layer (BSWA: 0)")
    p.add_argument("--dtype", default=d.dtype, choices=["float32", "bfloat16", "float16"], help="weights and "
                   "activations")
    p.add_argument("--device", default=d.device, help="cpu, cuda, cuda:1, ...")
    p.add_argument("--threads", type=int, default=d.threads, help="CPU threads")
    p.add_argument("--no-cuda-graphs", dest="cuda_graphs", action="store_false",
                   help="run the FAM chain eagerly on CUDA (default: replayed from CUDA graphs)")
    p.add_argument("--compile-chain", action="store_true",
                   help="preset: compile the layer calls of the FAM chain's CUDA graphs with torch.compile "
                        "(experimental; CUDA inference only, see hf_fam/modeling/fam_compile.py)")
    shared = ("parts", "prefill_lengths", "full_max_length", "decode_contexts", "decode_steps", "rounds", "chunk",
              "device", "threads")
    # a training step fragments a heap that never shrinks (hf_fam.runtime.cpu_memory): measuring one, the command
    # uses huge pages instead of keeping freed memory
    p.set_defaults(func=run, check=check, preset_shared={f: p.get_default(f) for f in shared},
                   allocator=lambda args: cpu_memory.HUGE_PAGES if "train" in args.parts else cpu_memory.KEEP)


def check(args) -> None:
    """Before the measurements: is matplotlib there for the plots drawn at the end?"""
    import importlib.util

    from ..errors import CLIError

    if importlib.util.find_spec("matplotlib") is None:
        raise CLIError("the benchmark draws its plots with matplotlib, which is not installed: "
                       "pip install 'hf-fam[bench]' (or pip install matplotlib)")


def run(args) -> int:
    from ...apps.bench import BenchConfig
    from ...apps.bench import run as run_suite

    if args.preset is not None:
        return run_preset(args)
    if args.compile_chain:
        from ..errors import CLIError

        raise CLIError("--compile-chain applies to the real shapes: add --preset llama-3.2-1b-gpu")

    fields = ("parts", "prefill_lengths", "full_max_length", "decode_contexts", "decode_steps", "stream_tokens",
              "train_length", "train_batch", "rounds", "chunk", "hidden", "layers", "heads", "vocab", "block_size",
              "memory_segments", "fam_length", "dtype", "device", "threads", "cuda_graphs")
    config = BenchConfig(**{f: getattr(args, f) for f in fields})
    run_suite(config, args.out or "benchmarks/results/suite")
    return 0


def run_preset(args) -> int:
    """A real-shape preset; the options given on the command line replace the preset's values."""
    from ...apps.bench_real import preset
    from ...apps.bench_real import run as run_real
    from ..errors import CLIError

    given = {f: getattr(args, f) for f, default in args.preset_shared.items() if getattr(args, f) != default}
    for flag, value in (("--warmup-tokens", args.warmup_tokens), ("--lora-rank", args.lora_rank)):
        if value is not None and value < 1:
            raise CLIError(f"{flag} must be >= 1, got {value}")
    if args.compile_chain:
        given["compile_chain"] = True
    if "stream" in given.get("parts", []):
        raise CLIError("--preset measures prefill, train and decode; the 1M-token stream is the small suite's "
                       "(hf-fam bench --parts stream)")
    try:
        config = preset(args.preset, batches=args.batches, train_lengths=args.train_lengths, lora_rank=args.lora_rank,
                        cpu_warmup_tokens=args.warmup_tokens, **given)
    except ValueError as e:
        raise CLIError(str(e)) from None
    if config.compile_chain and not config.device.startswith("cuda"):
        raise CLIError(f"--compile-chain compiles the FAM chain's CUDA graph steps, and this run is on "
                       f"{config.device}: drop --compile-chain, or run a CUDA preset (--preset llama-3.2-1b-gpu)")
    run_real(config, args.out or f"benchmarks/results/{args.preset}")
    return 0
