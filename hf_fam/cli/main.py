"""`hf-fam`: the command line over hf_fam.

This module is the entry point only (`hf_fam.cli:main`, the `hf-fam` console script). Each command lives in
`hf_fam/cli/commands/<name>.py` and exposes `register(subparsers)`, which adds its parser and sets `func` (and
optionally `check`, a quick look at the arguments before anything loads). What the commands share sits beside
this module, so that no command imports back into it: `errors.CLIError`, `formatting.HelpFormatter` and
`fam_args` (the FAM settings as options).
Heavy imports (torch, transformers) happen only once the arguments are parsed (`hf_fam.load()`, then inside
the commands), so `--help` and argument errors are instant. Errors a user can fix are printed as one line,
without a traceback, with exit status 2 (set HF_FAM_DEBUG=1 to see the traceback).
Before a command runs, the process sets how large CPU tensors get their memory (`hf_fam.runtime.cpu_memory`): a
command that reads keeps freed memory for reuse (no page fault per 4 KiB page), `finetune` leaves the allocator
alone, `bench` measuring a training step backs large tensors with huge pages. HF_FAM_ALLOCATOR=keep|huge_pages|system
chooses for any command; HF_FAM_SYSTEM_MALLOC=1 leaves the C library's allocator as it is.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

from .errors import CLIError

# in the order `hf-fam --help` lists them
COMMANDS = ("demo", "convert", "generate", "finetune", "eval", "card", "inspect", "verify", "push", "bench")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="hf-fam",
        description="TransformerFAM (Feedback Attention Memory) for Hugging Face models.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMANDS:
        try:
            module = importlib.import_module(f"hf_fam.cli.commands.{name}")
        except ModuleNotFoundError as err:
            if err.name == f"hf_fam.cli.commands.{name}":
                continue  # command not shipped in this build
            raise
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 0
    try:
        if getattr(args, "check", None):
            args.check(args)  # the command's own checks of its arguments, before the heavy imports
        from ..runtime import cpu_memory

        if not cpu_memory.opted_out():
            cpu_memory.apply(cpu_memory.mode(args))  # before torch allocates: it reads its huge page switch once
        import hf_fam

        _quiet_upstream_deprecations()
        hf_fam.load()  # torch, transformers and the `fam` model type, now that the arguments are valid
        result = args.func(args)
    except (CLIError, ValueError, OSError, ImportError) as err:  # ImportError: an optional package to install
        if os.environ.get("HF_FAM_DEBUG"):
            raise
        message = " ".join(str(err).split()) or type(err).__name__
        print(f"hf-fam {args.command}: error: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"hf-fam {args.command}: interrupted", file=sys.stderr)
        return 130
    return int(result or 0)


# deprecations one library's call of another raises on every command, which a user of the command cannot act on
UPSTREAM_DEPRECATIONS = (
    "`is_gradient_checkpointing` is deprecated",  # PEFT 0.21 reads transformers 5.25's old property name
)


def _quiet_upstream_deprecations() -> None:
    import warnings

    for message in UPSTREAM_DEPRECATIONS:
        warnings.filterwarnings("ignore", message=message, category=FutureWarning)
