"""Shared command-line options: the four FAM settings, declared once for every command that takes them, and
the options of an options dataclass (`add_options`, `options_from_args`, and `given_options`: which of them the
command line set, even to their default).

Defaults and validation come from `FAMSettings` (hf_fam/modeling/fam_settings.py), the one place they live.
"""

from __future__ import annotations

import argparse

from ..modeling.fam_settings import FAM_LAYER_CHOICES, FAMSettings

# the parsed namespace's attribute naming the options the command line set (`given_options`)
_GIVEN = "_fam_given_options"

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


def add_quantize_argument(parser) -> None:
    """--quantize 4bit|8bit: load the weights quantized by bitsandbytes (`hf_fam.runtime.quantize`)."""
    from ..runtime.quantize import QUANTIZATIONS

    parser.add_argument("--quantize", choices=QUANTIZATIONS, help="load the weights quantized by bitsandbytes "
                        "(4-bit NF4 or 8-bit), on --device; an adapter stays unmerged on its quantized base")


def settings_from_args(args: argparse.Namespace) -> FAMSettings:
    """The FAMSettings the parsed options name (defaults filled in)."""
    given = {field: getattr(args, field) for _, field, _, _ in FAM_OPTIONS if getattr(args, field, None) is not None}
    return FAMSettings(**given)


def add_options(group, options, only: tuple[str, ...] | None = None, skip: tuple[str, ...] = ()) -> None:
    """Add the flags of an options dataclass (hf_fam/training/options.py, hf_fam/evaluation/options.py) to
    `group`: each field that declares a flag, with the field's default and its metadata's help, choices, metavar,
    nargs and type. The dataclass is the one declaration of those options, for the API and the command line."""
    import argparse
    import dataclasses

    kinds = {"int": int, "float": float, "str": str}
    for f in dataclasses.fields(options):
        meta = f.metadata
        if "flag" not in meta or f.name in skip or (only is not None and f.name not in only):
            continue
        flags = meta["flag"] if isinstance(meta["flag"], tuple) else (meta["flag"],)
        kwargs = {"dest": f.name, "help": meta["help"]}
        annotation = str(f.type).replace(" | None", "")
        if annotation == "bool":
            kwargs["action"] = _GivenStoreFalse if meta.get("negate") else _GivenStoreTrue
        else:
            kwargs["action"] = _GivenStore
            kwargs["type"] = meta.get("type", kinds.get(annotation, str))
            kwargs["metavar"] = flags[0].lstrip("-").replace("-", "_").upper()  # --lr LR, not the field's name
            for key in ("choices", "metavar", "nargs"):
                if key in meta:
                    kwargs[key] = meta[key]
            if "choices" in meta and "metavar" not in meta:
                del kwargs["metavar"]  # argparse shows the choices
            if f.default is dataclasses.MISSING:
                kwargs["required"] = True
            else:
                kwargs["default"] = f.default
        if isinstance(group, argparse._ActionsContainer) and any(a.dest == f.name for a in group._actions):
            raise ValueError(f"two options set {f.name}")  # the dataclasses' field names must not collide
        group.add_argument(*flags, **kwargs)


def given_options(args: argparse.Namespace) -> frozenset[str]:
    """The field names of the options (`add_options`) the command line set, whatever their value: `--lora-rank 64`
    is given even where 64 is the default."""
    return frozenset(getattr(args, _GIVEN, ()))


class _Given(argparse.Action):
    """Records its dest in the namespace's given options, then stores as its base action does."""

    def __call__(self, parser, namespace, values, option_string=None):
        super().__call__(parser, namespace, values, option_string)
        setattr(namespace, _GIVEN, {*getattr(namespace, _GIVEN, ()), self.dest})


class _GivenStore(_Given, argparse._StoreAction):
    pass


class _GivenStoreTrue(_Given, argparse._StoreTrueAction):
    pass


class _GivenStoreFalse(_Given, argparse._StoreFalseAction):
    pass


def options_from_args(options, args, **given):
    """An options dataclass filled from the parsed arguments, field by field (missing ones keep their default)."""
    import dataclasses

    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(options) if hasattr(args, f.name)}
    return options(**{**values, **given})
