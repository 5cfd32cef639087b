"""The commands' shared help style.

`HelpFormatter` appends "(default: X)" once, only where a help text does not already speak of its default, and
fills `%(families)s` with the supported model types, read from the adapter table (`hf_fam.modeling.fam_adapters`)
only when that help is shown.
"""

from __future__ import annotations

import argparse


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
