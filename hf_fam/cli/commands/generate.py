"""`hf-fam generate`: read a prompt of any length at constant memory, then stream a continuation."""

from __future__ import annotations

import os

from ...modeling.fam_settings import DEFAULT_CHUNK_TOKENS
from ..fam_args import add_fam_arguments, add_quantize_argument
from ..formatting import HelpFormatter


def register(sub) -> None:
    p = sub.add_parser(
        "generate",
        help="read a (long) prompt at constant memory and stream a continuation to stdout",
        description="Read a prompt of any length through a FAM model, chunk by chunk (constant memory, a progress "
        "bar over the prompt on stderr), then generate a continuation, streamed token by token to stdout.",
        formatter_class=HelpFormatter,
    )
    p.add_argument("model", help="FAM checkpoint, a base checkpoint (model_type one of: %(families)s) run with "
                   "FAM, or a LoRA adapter of a FAM checkpoint (merged into its base): a folder or a Hub id")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", help="prompt text")
    src.add_argument("--prompt-file", help="text file holding the prompt; any size, read piece by piece")
    p.add_argument("--max-new-tokens", type=int, default=64, help="tokens to generate (>= 1)")
    p.add_argument("--chunk-tokens", type=int, default=DEFAULT_CHUNK_TOKENS,
                   help="prompt tokens per forward while reading (>= 1)")
    add_fam_arguments(p, base_only=True)
    p.add_argument("--do-sample", action="store_true", help="sample instead of greedy decoding")
    # None: the checkpoint's generation_config decides (and transformers' defaults where it is silent)
    p.add_argument("--temperature", type=float, default=None, help="sampling temperature (default: the "
                   "checkpoint's generation config)")
    p.add_argument("--top-k", type=int, default=None, help="top-k sampling (default: the checkpoint's)")
    p.add_argument("--top-p", type=float, default=None, help="nucleus sampling (default: the checkpoint's)")
    p.add_argument("--repetition-penalty", type=float, default=None, help="penalty for repeated tokens (default: "
                   "the checkpoint's)")
    p.add_argument("--seed", type=int, default=0, help="random seed for sampling")
    p.add_argument("--dtype", default="auto", help="auto, float32, bfloat16 or float16")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")
    add_quantize_argument(p)
    p.add_argument("--revision", help="Hub revision (branch, tag or commit)")
    p.add_argument("--token", help="Hub token for gated or private models")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run, check=check)


def check(args) -> None:
    """Refuse what cannot produce a continuation before the model loads: no tokens to generate, no prompt."""
    from ..errors import CLIError

    if args.max_new_tokens < 1:
        raise CLIError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    if args.chunk_tokens < 1:
        raise CLIError(f"--chunk-tokens must be >= 1, got {args.chunk_tokens}")
    if args.prompt is not None and not args.prompt.strip():
        raise CLIError("the prompt is empty; pass some text with --prompt")
    if args.prompt_file is not None:
        if not os.path.isfile(args.prompt_file):
            raise CLIError(f"prompt file not found: {args.prompt_file}")
        if _blank_file(args.prompt_file):
            raise CLIError(f"the prompt file {args.prompt_file} is empty (or only whitespace); put the prompt in it")


def _blank_file(path: str, piece: int = 1 << 20) -> bool:
    """True when the file holds nothing but whitespace (read until the first other character)."""
    with open(path, encoding="utf-8", errors="replace") as f:
        while text := f.read(piece):
            if not text.isspace():
                return False
    return True


def run(args) -> int:
    import torch
    from transformers import TextStreamer

    from ...runtime.loading import FAMOverrides, load_fam_model
    from ...runtime.streaming import continue_stream, iter_text_file_tokens, stream
    from ..errors import CLIError

    check(args)  # also when run() is called directly
    overrides = FAMOverrides.from_args(args)
    model, tokenizer = load_fam_model(args.model, overrides=overrides, dtype=args.dtype, device=args.device,
                                      revision=args.revision, token=args.token, adapters=True,
                                      quantize=args.quantize)
    if tokenizer is None:
        raise CLIError(f"{args.model} has no tokenizer files: generate needs one to read text")
    torch.manual_seed(args.seed)

    if args.prompt_file:
        chunks = iter_text_file_tokens(tokenizer, args.prompt_file, chunk_tokens=args.chunk_tokens)
        total = None
    else:
        ids = tokenizer(args.prompt, return_tensors="pt")["input_ids"][0]
        if ids.numel() == 0:
            raise CLIError("the prompt is empty")
        chunks = ids.split(args.chunk_tokens)
        total = ids.numel()
    state = stream(model, chunks, total=total, progress=not args.no_progress, keep_logits=False)
    if state.pending is None:
        raise CLIError("the prompt is empty")
    streamer = TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
    given = {name: getattr(args, name) for name in ("temperature", "top_k", "top_p", "repetition_penalty")
             if getattr(args, name) is not None}
    continue_stream(
        model, state, max_new_tokens=args.max_new_tokens, streamer=streamer, do_sample=args.do_sample,
        pad_token_id=tokenizer.pad_token_id, **given,
    )
    return 0
