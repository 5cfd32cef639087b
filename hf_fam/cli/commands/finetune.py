"""`hf-fam finetune`: LoRA fine-tuning of a FAM model (logic in `hf_fam.training.finetune`).

The options are the fields of the training options' dataclasses (hf_fam/training/options.py), declared there
once: flag, default and help; this module only groups them.

Examples:
    hf-fam finetune llama-fam --output runs/pk --data passkey --seq-len 4096 --steps 500
    hf-fam finetune meta-llama/Llama-3.2-1B --block-size 1024 --fam-length 64 --data text \
        --text-files corpus/ --seq-len 8192 --output runs/lct --merge
    accelerate launch --num_processes 2 -m hf_fam.cli finetune llama-fam --output runs/pk ...
"""

from __future__ import annotations

from ..fam_args import add_fam_arguments
from ..formatting import HelpFormatter

HELP = "LoRA fine-tuning with the paper's recipe (PEFT adapter + trained fam_init); runs under accelerate launch."


def add_options(group, options, only: tuple[str, ...] | None = None, skip: tuple[str, ...] = ()) -> None:
    """Add the flags of an options dataclass (hf_fam/training/options.py) to `group`: each field that declares
    a flag, with the field's default and its metadata's help, choices, metavar, nargs and type."""
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
            kwargs["action"] = "store_false" if meta.get("negate") else "store_true"
        else:
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


def _declared(options, args, **given):
    """An options dataclass filled from the parsed arguments, field by field (missing ones keep their default)."""
    import dataclasses

    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(options) if hasattr(args, f.name)}
    return options(**{**values, **given})


def register(subparsers) -> None:
    from ...training.options import DataOptions, FAMRecipeConfig, LoraOptions, ModelOptions, TrainOptions

    p = subparsers.add_parser(
        "finetune", help=HELP, description=HELP + " Multi-process: accelerate launch [--multi_gpu] --num_processes N "
        "-m hf_fam.cli finetune ... (or torchrun --nproc_per_node N -m hf_fam.cli finetune ...).",
        formatter_class=HelpFormatter,
    )
    p.add_argument("path", metavar="model", help=ModelOptions.__dataclass_fields__["path"].metadata["help"])
    add_options(p, TrainOptions, only=("output_dir", "overwrite"))
    g = p.add_argument_group("model (base checkpoints only; a FAM checkpoint keeps its own settings)")
    add_fam_arguments(g, base_only=True)
    add_options(g, ModelOptions)
    add_options(p.add_argument_group("data"), DataOptions)
    add_options(p.add_argument_group("LoRA"), LoraOptions)
    add_options(p.add_argument_group("recipe (paper Appendix B.2; 0 switches a trick off)"), FAMRecipeConfig)
    add_options(p.add_argument_group("optimisation"), TrainOptions, skip=("output_dir", "overwrite"))
    p.set_defaults(func=run)


def config_from_args(args):
    """Build a FinetuneConfig from parsed arguments (validation happens in the dataclasses)."""
    from hf_fam.training.options import (
        DataOptions,
        FAMRecipeConfig,
        FinetuneConfig,
        LoraOptions,
        ModelOptions,
        TrainOptions,
    )

    return FinetuneConfig(
        model=_declared(ModelOptions, args),
        data=_declared(DataOptions, args),
        lora=_declared(LoraOptions, args),
        recipe=_declared(FAMRecipeConfig, args),  # its seed is --seed, the run's
        train=_declared(TrainOptions, args),
    )


def run(args) -> int:
    import logging
    import os

    config = config_from_args(args)  # bad options fail here, before anything heavy loads
    main_process = int(os.environ.get("RANK", os.environ.get("LOCAL_RANK", "0"))) == 0
    logging.basicConfig(level=logging.INFO if main_process else logging.WARNING,
                        format="hf-fam finetune: %(message)s")
    for noisy in ("transformers", "datasets", "accelerate", "peft", "torch"):
        logging.getLogger(noisy).setLevel(logging.WARNING)

    from accelerate import PartialState

    from hf_fam.training.finetune import finetune

    result = finetune(config)
    # Close the process group before the interpreter exits: a gloo process left to tear it down at exit
    # was seen to abort ("terminate called without an active exception", SIGABRT) in the DDP test.
    PartialState().destroy_process_group()
    if main_process:
        print(f"adapter: {result.output_dir} ({result.steps} steps, final loss {result.final_loss:.4f}, "
              f"{result.seconds:.1f} s, {result.world_size} process(es))")
        if result.merged_dir:
            print(f"merged model: {result.merged_dir}")
    return 0
