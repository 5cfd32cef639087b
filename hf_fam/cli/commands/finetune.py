"""`hf-fam finetune`: LoRA (or, with --full, every-weight) fine-tuning of a FAM model (logic in
`hf_fam.training.finetune`).

The options are the fields of the training options' dataclasses (hf_fam/training/options.py), declared there
once: flag, default and help; this module only groups them.

Examples:
    hf-fam finetune llama-fam --output runs/pk --data passkey --seq-len 4096 --steps 500
    hf-fam finetune meta-llama/Llama-3.2-1B --block-size 1024 --fam-length 64 --data text \
        --text-files corpus/ --seq-len 8192 --output runs/lct --merge
    accelerate launch --num_processes 2 -m hf_fam.cli finetune llama-fam --output runs/pk ...
"""

from __future__ import annotations

from ...runtime import cpu_memory
from ..fam_args import add_fam_arguments, add_options, given_options, options_from_args
from ..formatting import HelpFormatter

HELP = ("LoRA fine-tuning with the paper's recipe (PEFT adapter + trained fam_init), or every weight with --full; "
        "runs under accelerate launch.")


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
    add_options(p.add_argument_group("LoRA (or --full)"), LoraOptions)
    add_options(p.add_argument_group("recipe (paper Appendix B.2; 0 switches a trick off)"), FAMRecipeConfig)
    add_options(p.add_argument_group("optimisation"), TrainOptions, skip=("output_dir", "overwrite"))
    # training fragments a kept heap; huge pages (HF_FAM_ALLOCATOR=huge_pages) halve memory but were slower on short
    # steps (hf_fam.runtime.cpu_memory)
    p.set_defaults(func=run, allocator=cpu_memory.SYSTEM)


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
        model=options_from_args(ModelOptions, args),
        data=options_from_args(DataOptions, args),
        lora=options_from_args(LoraOptions, args),
        recipe=options_from_args(FAMRecipeConfig, args),  # its seed is --seed, the run's
        train=options_from_args(TrainOptions, args),
    )


def run(args) -> int:
    import logging
    import os

    from hf_fam.training.continued import adapter_to_continue

    config = config_from_args(args)  # bad options fail here, before anything heavy loads
    # an adapter to train further fixes its LoRA options: refused when given, even at their defaults (finetune
    # itself can only see values that differ from them)
    adapter_to_continue(config, given=given_options(args))
    main_process = int(os.environ.get("RANK", os.environ.get("LOCAL_RANK", "0"))) == 0
    logging.basicConfig(level=logging.INFO if main_process else logging.WARNING,
                        format="hf-fam finetune: %(message)s")
    for noisy in ("transformers", "datasets", "accelerate", "peft", "torch"):
        logging.getLogger(noisy).setLevel(logging.WARNING)

    from accelerate import PartialState

    from hf_fam.training.finetune import finetune
    from hf_fam.training.heldout import heldout_text
    from hf_fam.training.options import split_text

    result = finetune(config)
    # Close the process group before the interpreter exits: a gloo process left to tear it down at exit
    # was seen to abort ("terminate called without an active exception", SIGABRT) in the DDP test.
    PartialState().destroy_process_group()
    if main_process:
        saved = "model" if config.lora.full else "adapter"
        split = split_text(result.final_loss_fresh_memory, result.final_loss_passed_memory)
        print(f"{saved}: {result.output_dir} ({result.steps} steps in {result.seconds:.1f} s, {result.world_size} "
              f"process(es)); final loss {result.final_loss:.4f}{split}")
        losses = result.heldout_losses
        if "final" in losses:
            print(heldout_text(losses.get("given"), losses.get("start"), losses["final"],
                               result.heldout_sequences))
        if result.text_line:
            print(result.text_line)
        if result.merged_dir:
            print(f"merged model: {result.merged_dir}")
    return 0
