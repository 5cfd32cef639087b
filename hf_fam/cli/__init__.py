"""The `hf-fam` command line: `main` (the console script's entry point), its commands under `commands/`."""

from __future__ import annotations

from .main import COMMANDS, CLIError, HelpFormatter, RawDescriptionHelpFormatter, build_parser, main, supported_families

__all__ = ["COMMANDS", "CLIError", "HelpFormatter", "RawDescriptionHelpFormatter", "build_parser", "main",
           "supported_families"]
