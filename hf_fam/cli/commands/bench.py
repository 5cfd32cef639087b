"""`hf-fam bench`: the performance suite (prefill, training step, decode, 1M-token stream)."""

from __future__ import annotations

from ..formatting import HelpFormatter


def register(sub) -> None:
    from ...apps.bench import BenchConfig

    d = BenchConfig()
    p = sub.add_parser(
        "bench",
        help="benchmark FAM against BSWA and full attention (prefill, training, decode, streaming memory)",
        description="Measure prefill time and peak memory vs N, a training step, decode latency vs context and a "
        "1M-token stream's peak memory, for full attention, BSWA (F=0) and FAM on a small Llama; interleaved "
        "rounds, medians of ratios; writes JSON, a markdown table and PNG plots.",
        formatter_class=HelpFormatter,
    )
    p.add_argument("--out", default="benchmarks/results/suite", help="output path stem (.json, .md, _*.png)")
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
    p.set_defaults(func=run, check=check)


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

    fields = ("parts", "prefill_lengths", "full_max_length", "decode_contexts", "decode_steps", "stream_tokens",
              "train_length", "train_batch", "rounds", "chunk", "hidden", "layers", "heads", "vocab", "block_size",
              "memory_segments", "fam_length", "dtype", "device", "threads", "cuda_graphs")
    config = BenchConfig(**{f: getattr(args, f) for f in fields})
    run_suite(config, args.out)
    return 0
