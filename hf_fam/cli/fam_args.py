"""The four FAM settings as command-line options, declared once for every command that takes them.

Defaults and validation come from `FAMSettings` (hf_fam/modeling/fam_settings.py), the one place they live.
"""

from __future__ import annotations

import argparse

from ..modeling.fam_settings import FAM_LAYER_CHOICES, FAMSettings

# (flag, field, metavar, help)
FAM_OPTIONS = (
    ("--block-size", "block_size", "C", "tokens per block"),
    ("--memory-segments", "memory_segments", "M", "previous blocks each block attends to (0 = none)"),
    ("--fam-length", "fam_length", "F", "FAM (memory) tokens per layer (0 = block sliding window attention)"),
    ("--fam-layers", "fam_layers", "{" + ",".join(FAM_LAYER_CHOICES) + "}",
     "which layers carry FAM: all, or only the checkpoint's full-attention layers (global)"),
)


def add_fam_arguments(parser: argparse.ArgumentParser | argparse._ArgumentGroup, *, base_only: bool) -> None:
    """Add --block-size, --memory-segments, --fam-length and --fam-layers.

    Args:
        parser: the parser or argument group to add them to.
        base_only: True where a FAM checkpoint keeps its own settings and these apply to base checkpoints
            wrapped on the fly (the value stays None unless given); False where they are always used
            (`convert`: the paper's values are the defaults).
    """
    defaults = FAMSettings()
    for flag, field, metavar, text in FAM_OPTIONS:
        default = getattr(defaults, field)
        kind = str if field == "fam_layers" else int
        extra = {"choices": FAM_LAYER_CHOICES} if field == "fam_layers" else {}
        where = ", for a base checkpoint" if base_only else ""
        parser.add_argument(flag, type=kind, default=None if base_only else default, metavar=metavar,
                            help=f"{metavar.strip('{}') if field != 'fam_layers' else 'fam_layers'}: {text}{where} "
                                 f"(default {default})", **extra)


def settings_from_args(args: argparse.Namespace) -> FAMSettings:
    """The FAMSettings the parsed options name (defaults filled in)."""
    given = {field: getattr(args, field) for _, field, _, _ in FAM_OPTIONS if getattr(args, field, None) is not None}
    return FAMSettings(**given)
