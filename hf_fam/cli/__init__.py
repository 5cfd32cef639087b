"""The `hf-fam` command line.

`main.py` is the entry point (`hf_fam.cli:main`, the console script; `python -m hf_fam.cli` runs it too);
`commands/<name>.py` holds one command each; what the commands share sits beside them: `errors.CLIError`,
`formatting.HelpFormatter` and `fam_args` (the FAM settings as options). Commands import those modules, never
the entry point.
"""

from __future__ import annotations

from .errors import CLIError
from .formatting import HelpFormatter, RawDescriptionHelpFormatter, supported_families
from .main import COMMANDS, build_parser, main

__all__ = ["COMMANDS", "CLIError", "HelpFormatter", "RawDescriptionHelpFormatter", "build_parser", "main",
           "supported_families"]
