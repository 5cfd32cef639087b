"""`hf-fam`: the command line over hf_fam.

Each command lives in `hf_fam/commands/<name>.py` and exposes `register(subparsers)`, which adds its
parser and sets `func`. Heavy imports (torch, transformers) happen inside the commands, so `--help` is
instant. Errors a user can fix are printed as one line, without a traceback, with exit status 2
(set HF_FAM_DEBUG=1 to see the traceback).
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

# in the order `hf-fam --help` lists them
COMMANDS = ("demo", "convert", "generate", "finetune", "eval", "card", "inspect", "verify", "bench")


class CLIError(Exception):
    """An error the user can fix; printed as one line."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="hf-fam",
        description="TransformerFAM (Feedback Attention Memory) for Hugging Face models.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMANDS:
        try:
            module = importlib.import_module(f"hf_fam.commands.{name}")
        except ModuleNotFoundError as err:
            if err.name == f"hf_fam.commands.{name}":
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
        result = args.func(args)
    except (CLIError, ValueError, OSError) as err:
        if os.environ.get("HF_FAM_DEBUG"):
            raise
        message = " ".join(str(err).split()) or type(err).__name__
        print(f"hf-fam {args.command}: error: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"hf-fam {args.command}: interrupted", file=sys.stderr)
        return 130
    return int(result or 0)


if __name__ == "__main__":
    sys.exit(main())
