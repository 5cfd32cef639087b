"""`hf-fam convert`: write a FAM checkpoint from a Hub id, a local checkpoint of a supported family, or a GGUF file."""

from __future__ import annotations

import signal
import textwrap
from contextlib import contextmanager

from ...modeling.fam_settings import FAM_UPDATE_CHOICES, ZERO_SHOT_FAM_UPDATE
from ..fam_args import add_fam_arguments
from ..formatting import RawDescriptionHelpFormatter

FAM_INIT_HELP = """\
how the memory's initial value fam_init (F x hidden, the only new tensor) starts:
'bos' (default) puts the BOS token's embedding in every slot: through the layers each slot becomes the BOS
token's hidden state, the attention sink pretrained models rely on. With --fam-update sink (default) the
converted model reads it as a sink the window never loses, so it is usable before fine-tuning.
'random' draws it like any new weight (normal, std = the config's initializer_range, from --seed), as
FAMForCausalLM.from_base_model does: noise the base model never saw, to be learned by fine-tuning.
'text:TEXT' takes the token-embedding rows of TEXT's first F tokens (repeated when TEXT is shorter),
stored unscaled like the embedding matrix; the model scales them as it scales token embeddings (Gemma:
x sqrt(hidden)), so before fine-tuning the memory starts as input the model knows, e.g.
'text:Summary of the text so far:'.
'file:PATH' loads an (F, hidden) tensor from a .safetensors or .pt file (weights_only), e.g. a trained one."""


def register(sub) -> None:
    p = sub.add_parser(
        "convert",
        help="convert a decoder checkpoint (Hub id or folder) into a FAM checkpoint",
        description=textwrap.fill(
            "Write a FAM checkpoint to OUT: SRC's weights unchanged, plus fam.fam_init; config.json as a "
            "FAMConfig with auto_map; hf_fam's remote-code files, so that AutoModelForCausalLM.from_pretrained(OUT, "
            "trust_remote_code=True) loads it without hf_fam; SRC's tokenizer, generation config and license files; "
            "and a model card (README.md). Weights are copied shard by shard as bytes, never loaded as a model: "
            "beyond the imports, memory holds one 8 MiB copy buffer, whatever the shard size. OUT is written to a "
            "hidden temporary folder next to it and moved into place at the end: a failed or interrupted run "
            "leaves no OUT behind. SRC is never modified.",
            width=100,
        ),
        formatter_class=RawDescriptionHelpFormatter,
        epilog="examples:\n  hf-fam convert meta-llama/Llama-3.2-1B llama-fam --block-size 1024 --memory-segments 3 "
        "--fam-length 64\n  hf-fam convert SmolLM2-135M-Instruct.Q4_1.gguf smollm2-fam --dtype float32\n\nfam_init:\n  "
        + FAM_INIT_HELP.replace("\n", "\n  "),
    )
    p.add_argument("src", metavar="SRC",
                   help="a Hub repo id (e.g. meta-llama/Llama-3.2-1B), a local checkpoint folder, or a .gguf file "
                   "(dequantised to --dtype; its tokenizer is carried); model_type one of: %(families)s")
    p.add_argument("out", metavar="OUT", help="the folder to write (must not exist, unless --force)")
    add_fam_arguments(p, base_only=False)
    p.add_argument("--fam-init", default="bos", metavar="SPEC",
                   help="'bos' (default), 'random', 'text:TEXT' or 'file:PATH'; see 'fam_init' below")
    p.add_argument("--fam-update", choices=FAM_UPDATE_CHOICES, default=ZERO_SHOT_FAM_UPDATE,
                   help="'sink' (default): zero-shot start, the memory is not updated and block tokens read its "
                   "first slot as an attention sink until fine-tuning (hf-fam finetune) switches to 'paper'; "
                   "'paper': the paper's update after every block (for a trained fam_init)")
    p.add_argument("--gguf-file", metavar="NAME",
                   help="with a folder SRC: the GGUF file in it to convert (needs `pip install gguf`)")
    p.add_argument("--dtype", choices=("float32", "bfloat16", "float16"),
                   help="GGUF sources only: the dtype the weights are dequantised to (default float32)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random fam_init (default 0)")
    p.add_argument("--revision", help="Hub branch, tag or commit of SRC (Hub ids only)")
    p.add_argument("--token", help="Hub token for gated or private repos (default: your login or $HF_TOKEN, "
                   "which keeps the token out of the process list)")
    p.add_argument("--force", action="store_true", help="replace OUT if it exists (only once the new one is complete)")
    p.add_argument("--allow-pickle", action="store_true",
                   help="accept pytorch_model*.bin weights (pickle can run code; they are read with "
                   "torch.load(weights_only=True)) and write them as safetensors")
    p.add_argument("--base-model", metavar="ID", help="Hub id of SRC for the card's base_model "
                   "(default: SRC when it is a Hub id)")
    p.add_argument("--repo-id", metavar="ID", help="Hub id OUT will be pushed to, for the card's usage snippet "
                   "(default: OUT's folder name)")
    p.add_argument("--eval-results", metavar="JSON", action="append",
                   help="evaluation results for the card, repeatable (see `hf-fam card -h`)")
    p.add_argument("--quiet", action="store_true", help="no progress bar and no summary")
    p.set_defaults(func=run)


@contextmanager
def _sigterm_as_interrupt():
    """SIGTERM raises KeyboardInterrupt, so the temporary folder is removed as on Ctrl-C."""

    def handler(signum, frame):
        raise KeyboardInterrupt

    try:
        previous = signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not the main thread: leave signals alone
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def run(args) -> int:
    from ...checkpoint_io.convert import ConvertOptions, convert
    from ..errors import CLIError

    options = ConvertOptions(
        block_size=args.block_size, memory_segments=args.memory_segments, fam_length=args.fam_length,
        fam_layers=args.fam_layers, fam_init=args.fam_init, fam_update=args.fam_update, seed=args.seed,
        revision=args.revision, token=args.token, force=args.force,
        allow_pickle=args.allow_pickle, base_model=args.base_model, repo_id=args.repo_id,
        eval_results=args.eval_results, progress=not args.quiet, gguf_file=args.gguf_file, dtype=args.dtype,
    )
    try:
        with _sigterm_as_interrupt():
            result = convert(args.src, args.out, options)
    except (FileNotFoundError, FileExistsError, PermissionError):
        raise  # already one line
    except OSError as err:  # e.g. the disk filled up; the partial output is gone already
        raise CLIError(f"writing {args.out} failed: {err.strerror or err}") from None
    if not args.quiet:
        print(f"wrote {result.out}: {result.num_tensors} tensors ({result.total_bytes / 1e6:,.1f} MB) in "
              f"{len(result.weight_files)} file(s), C={args.block_size} M={args.memory_segments} F={args.fam_length} "
              f"fam_layers={args.fam_layers}")
        if result.carried_files:
            print(f"carried over: {', '.join(result.carried_files)}")
        if result.dropped_tensors:
            shown = ", ".join(result.dropped_tensors[:5]) + (" ..." if len(result.dropped_tensors) > 5 else "")
            print(f"left out {len(result.dropped_tensors)} tensor(s) the model does not use: {shown}")
        print(f"load it with AutoModelForCausalLM.from_pretrained({str(result.out)!r}, trust_remote_code=True)")
    return 0
