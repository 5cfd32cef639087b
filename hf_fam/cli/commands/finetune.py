"""`hf-fam finetune`: LoRA fine-tuning of a FAM model (logic in `hf_fam.training.finetune`).

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


def _csv(value: str) -> tuple[str, ...]:
    return tuple(v.strip() for v in value.split(",") if v.strip())


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "finetune", help=HELP, description=HELP + " Multi-process: accelerate launch [--multi_gpu] --num_processes N "
        "-m hf_fam.cli finetune ... (or torchrun --nproc_per_node N -m hf_fam.cli finetune ...).",
        formatter_class=HelpFormatter,
    )
    p.add_argument("model", help="FAM checkpoint, or a base checkpoint (model_type one of: %(families)s), "
                                 "converted on the fly with --block-size/--memory-segments/--fam-length: a folder "
                                 "or a Hub id")
    p.add_argument("--output", "-o", required=True, help="output folder: adapter, logs, fam_base/, merged/; "
                   "must not exist or be empty, unless --force")
    p.add_argument("--force", action="store_true", help="replace a non-empty --output folder, once this run is done "
                   "(the run writes beside it and swaps; old and new files never mix)")
    g = p.add_argument_group("model (base checkpoints only; a FAM checkpoint keeps its own settings)")
    add_fam_arguments(g, base_only=True)
    g.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16", "auto"),
                   help="weights dtype")
    g = p.add_argument_group("data")
    g.add_argument("--data", default="passkey", choices=("passkey", "text"), help="training data")
    g.add_argument("--text-files", nargs="+", default=(), metavar="PATH",
                   help="text data: .txt/.md (one document per file), .json/.jsonl/.csv/.parquet rows, folders of "
                        "those, or a folder saved with Dataset.save_to_disk")
    g.add_argument("--text-column", default="text", help="column holding the text (json/csv/parquet/saved datasets)")
    g.add_argument("--seq-len", type=int, default=2048,
                   help="tokens per training sequence; for text data a multiple of the block size")
    g.add_argument("--passkey-form", default="text", choices=("text", "synthetic"),
                   help="passkey in words for any tokenizer, or the 33-token synthetic form for tiny models")
    g.add_argument("--passkey-examples", type=int, default=2000, help="passkey training examples")
    g.add_argument("--passkey-min-seq-len", type=int, help="random passkey lengths in [this, --seq-len]")
    g.add_argument("--passkey-depth", type=float, help="key depth in the filler, 0 (start) to 1 (end); default random")
    g.add_argument("--passkey-vocab-offset", type=int, default=0, help="first token id of the synthetic form")
    g = p.add_argument_group("LoRA")
    g.add_argument("--lora-rank", type=int, default=64, help="LoRA rank (the paper uses 64)")
    g.add_argument("--lora-alpha", type=int, help="LoRA alpha (default: the rank)")
    g.add_argument("--lora-dropout", type=float, default=0.0, help="LoRA dropout")
    g.add_argument("--lora-targets", type=_csv, help="comma-separated module names (default: the family's "
                                                     "q/k/v/o and gate/up/down projections)")
    g.add_argument("--freeze-fam-init", action="store_true", help="do not train the initial memory fam_init")
    g = p.add_argument_group("recipe (paper Appendix B.2; 0 switches a trick off)")
    g.add_argument("--state-passing-prob", type=float, default=0.8,
                   help="Random State Passing: probability to start a step from the previous step's final memory")
    g.add_argument("--position-offset-prob", type=float, default=0.5,
                   help="Random Position Offset: probability of a non-zero offset per row (only float rounding "
                        "changes in hf_fam: every block has its own position frame)")
    g.add_argument("--max-position-offset", type=int, help="offsets below this (default: 2*pi*rope_theta)")
    g = p.add_argument_group("optimisation")
    g.add_argument("--steps", type=int, default=100, help="optimizer steps")
    g.add_argument("--batch-size", type=int, default=1, help="sequences per process per micro-batch")
    g.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimizer step")
    g.add_argument("--lr", type=float, default=1e-4, help="peak learning rate")
    g.add_argument("--lr-scheduler", default="constant_with_warmup",
                   choices=("constant", "constant_with_warmup", "linear", "cosine"), help="learning-rate schedule")
    g.add_argument("--warmup-steps", type=int, default=0, help="warmup steps")
    g.add_argument("--weight-decay", type=float, default=0.0, help="AdamW weight decay")
    g.add_argument("--max-grad-norm", type=float, default=1.0, help="gradient clipping norm")
    g.add_argument("--gradient-checkpointing", action="store_true", help="recompute activations (saves memory)")
    g.add_argument("--seed", type=int, default=0, help="seed for weights, data order and the recipe")
    g.add_argument("--log-every", type=int, default=10, help="log every N steps")
    g.add_argument("--merge", action="store_true", help="also save the LoRA-merged model to OUTPUT/merged")
    g.add_argument("--cpu", action="store_true", help="train on CPU even where a GPU is present")
    p.set_defaults(func=run)


def config_from_args(args):
    """Build a FinetuneConfig from parsed arguments (validation happens in the dataclasses)."""
    from hf_fam.training.finetune import DataOptions, FinetuneConfig, LoraOptions, ModelOptions, TrainOptions
    from hf_fam.training.recipe import FAMRecipeConfig

    return FinetuneConfig(
        model=ModelOptions(path=args.model, block_size=args.block_size, memory_segments=args.memory_segments,
                           fam_length=args.fam_length, fam_layers=args.fam_layers, dtype=args.dtype),
        data=DataOptions(source=args.data, text_files=tuple(args.text_files), text_column=args.text_column,
                         seq_len=args.seq_len, passkey_form=args.passkey_form, passkey_examples=args.passkey_examples,
                         passkey_min_seq_len=args.passkey_min_seq_len, passkey_depth=args.passkey_depth,
                         passkey_vocab_offset=args.passkey_vocab_offset),
        lora=LoraOptions(r=args.lora_rank, alpha=args.lora_alpha, dropout=args.lora_dropout,
                         target_modules=args.lora_targets, train_fam_init=not args.freeze_fam_init),
        recipe=FAMRecipeConfig(state_passing_prob=args.state_passing_prob,
                               position_offset_prob=args.position_offset_prob,
                               max_position_offset=args.max_position_offset, seed=args.seed),
        train=TrainOptions(output_dir=args.output, max_steps=args.steps, batch_size=args.batch_size,
                           gradient_accumulation_steps=args.grad_accum, learning_rate=args.lr,
                           lr_scheduler=args.lr_scheduler, warmup_steps=args.warmup_steps,
                           weight_decay=args.weight_decay, max_grad_norm=args.max_grad_norm,
                           gradient_checkpointing=args.gradient_checkpointing, seed=args.seed,
                           log_every=args.log_every, merge=args.merge, overwrite=args.force, cpu=args.cpu),
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
