"""`hf-fam`: the command line over hf_fam.

Each command lives in `hf_fam/commands/<name>.py` and exposes `register(subparsers)`, which adds its
parser and sets `func` (and optionally `check`, a quick look at the arguments before anything loads).
Heavy imports (torch, transformers) happen only once the arguments are parsed (`hf_fam.load()`, then inside
the commands), so `--help` and argument errors are instant. Errors a user can fix are printed as one line,
without a traceback, with exit status 2 (set HF_FAM_DEBUG=1 to see the traceback).

`HelpFormatter` is the commands' shared help style: "(default: X)" appended once, only where a help text does
not already speak of its default, and `%(families)s` filled with the supported model types, read from the
adapter table (`hf_fam.modeling.fam_adapters`) only when that help is shown.
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


def supported_families() -> str:
    """The model types FAM supports, "gemma, gemma2, ...": the keys of the adapter table `ADAPTERS`.

    Read from fam_adapters.py's source (the module imports torch, seconds a help text should not wait);
    `supported_model_types()` where the table is not a plain dict literal. tests/test_cli.py checks they agree.
    """
    import ast
    from pathlib import Path

    source = Path(__file__).resolve().parents[1] / "modeling" / "fam_adapters.py"
    try:
        for node in ast.parse(source.read_text()).body:
            target = getattr(node, "target", None) or (getattr(node, "targets", None) or [None])[0]
            if getattr(target, "id", None) == "ADAPTERS" and isinstance(node.value, ast.Dict):
                return ", ".join(sorted(ast.literal_eval(key) for key in node.value.keys))
    except (OSError, SyntaxError, ValueError):
        pass
    from ..modeling.fam_adapters import supported_model_types

    return ", ".join(supported_model_types())


class HelpFormatter(argparse.HelpFormatter):
    """Appends "(default: X)" once, where the help does not already state it; fills `%(families)s` lazily."""

    def _get_help_string(self, action):
        text = action.help or ""
        default = action.default
        if ("default" in text or default is None or isinstance(default, bool) or default == ()
                or default is argparse.SUPPRESS or not action.option_strings):
            return text
        return text + " (default: %(default)s)"

    def _expand_help(self, action):
        text = self._get_help_string(action)
        if "%(families)" in text:
            text = text.replace("%(families)s", supported_families())
        params = {k: v for k, v in vars(action).items() if v is not argparse.SUPPRESS}
        params["prog"] = self._prog
        if isinstance(params.get("default"), (list, tuple)):  # nargs="+": shown as typed, "1 2 4"
            params["default"] = " ".join(str(v) for v in params["default"])
        if params.get("choices") is not None:
            params["choices"] = ", ".join(str(c) for c in params["choices"])
        return text % params


class RawDescriptionHelpFormatter(HelpFormatter, argparse.RawDescriptionHelpFormatter):
    """`HelpFormatter`, with the description and epilog printed as written."""


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
        import hf_fam

        hf_fam.load()  # torch, transformers and the `fam` model type, now that the arguments are valid
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

