"""The error a command raises for a mistake the user can fix: `hf_fam.cli.main` prints it as one line, exit status 2."""

from __future__ import annotations


class CLIError(Exception):
    """An error the user can fix; printed as one line."""
