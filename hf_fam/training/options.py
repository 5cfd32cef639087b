"""The training options: what `finetune` takes and returns (`FinetuneConfig`: model, data, LoRA, recipe and loop
options; `FinetuneResult`), and the paper's recipe options (`FAMRecipeConfig`, which `attach_recipe` takes).
Split from `finetune.py` (the loop) and `recipe.py` (the recipe's hooks).

Each option is declared once, here, for the Python API and for `hf-fam finetune` alike: its default is the
field's default, and its metadata holds the help text and, where the command line offers it, the flag
(`"flag"`, with any of argparse's `metavar`, `choices`, `nargs`, `type`; `"negate"` for a flag that sets a
True default to False). `hf_fam/cli/commands/finetune.py` builds its options from these fields and fills the
dataclasses back from the parsed arguments by field name. The FAM settings (C, M, F, fam_layers) come from
`FAMSettings` through the command line's shared `--block-size` ... options instead.

This module imports no torch, peft or transformers (nor anything that does), so that `hf-fam finetune --help`
reads these declarations in an instant.
"""

from __future__ import annotations

from dataclasses import MISSING, dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING

from ..modeling.fam_settings import DEFAULT_LOSS_CHUNK_TOKENS, FAM_LAYER_CHOICES
from ..runtime.quantize import QUANTIZATIONS
from ..tasks import PASSKEY_FILLER, PASSKEY_FORMS

if TYPE_CHECKING:
    from ..tasks.passkey import PasskeyConfig

DTYPES = ("float32", "bfloat16", "float16", "auto")
DATA_SOURCES = ("passkey", "text", "mix")
SCHEDULERS = ("constant", "constant_with_warmup", "linear", "cosine")
# LoRA's start: PEFT's (B = 0: the model starts unchanged) or PiSSA's (A and B from each weight's top singular
# vectors, the residual left in the base; `hf_fam.training.lora.PEFT_LORA_INITS` maps these to PEFT's values)
LORA_INITS = ("peft", "pissa")

# Paper §3.1: "The rank of LoRA was 64". Alpha and dropout are not stated; alpha = rank (scaling 1) here.
DEFAULT_LORA_RANK = 64

# Where `hf-fam finetune` starts the memory's slots 1..F-1 when it trains from the zero-shot BOS start
# (`hf_fam.checkpoint_io.fam_init.training_fam_init`; docs/training.md, "Where training starts the memory")
# (the passkey filler's plain sentences; measured to learn, where "Summary of the text so far:" did not in 50 steps)
DEFAULT_MEMORY_START_TEXT = "".join(PASSKEY_FILLER[:4])

# held out of the training data by `hf-fam finetune` to tell whether the run helped (training/heldout.py)
DEFAULT_HELDOUT_SEQUENCES = 16

# Paper Appendix B / Table 4 defaults
DEFAULT_STATE_PASSING_PROB = 0.8
DEFAULT_POSITION_OFFSET_PROB = 0.5


@dataclass
class FAMRecipeConfig:
    """Options of the paper's training recipe (Appendix B.2). Probabilities of 0 switch a trick off."""

    # the seed is TrainOptions.seed on the command line (--seed)
    state_passing_prob: float = field(
        default=DEFAULT_STATE_PASSING_PROB,
        metadata={"help": "Random State Passing: probability that a training forward starts from the previous "
                          "forward's final FAM (row 0's, detached) instead of fam_init (0 = off)",
                  "flag": "--state-passing-prob"},
    )
    position_offset_prob: float = field(
        default=DEFAULT_POSITION_OFFSET_PROB,
        metadata={"help": "Random Position Offset: probability that a row gets a non-zero offset (0 = off; in hf_fam "
                          "only float rounding changes: every block has its own position frame)",
                  "flag": "--position-offset-prob"},
    )
    max_position_offset: int | None = field(
        default=None,
        metadata={"help": "offsets are uniform integers in [0, this) (default: the largest RoPE wavelength, "
                          "2*pi*rope_theta)", "flag": "--max-position-offset"},
    )
    seed: int = field(default=0, metadata={"help": "seed of the recipe's own random generator"})

    def __post_init__(self):
        for name in ("state_passing_prob", "position_offset_prob"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
                raise ValueError(f"{name} must be a probability in [0, 1], got {value!r}")
        if self.max_position_offset is not None and (
            isinstance(self.max_position_offset, bool) or not isinstance(self.max_position_offset, int)
            or self.max_position_offset < 1
        ):
            raise ValueError(
                f"max_position_offset must be a positive integer or None, got {self.max_position_offset!r}"
            )
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise ValueError(f"seed must be an integer, got {self.seed!r}")

    @property
    def enabled(self) -> bool:
        return self.state_passing_prob > 0 or self.position_offset_prob > 0



def option(default=MISSING, help: str = "", flag: str | tuple[str, ...] | None = None, **cli):
    """A dataclass field declared once for the API and the command line (see the module docstring).

    Args:
        default: the field's default; none makes the field (and its flag) required.
        help: what the option does, as `--help` prints it (defaults are appended there, not written here).
        flag: the command-line flag(s), e.g. "--steps" or ("--output", "-o"); None: not a flag of its own.
        cli: argparse's `metavar`, `choices`, `nargs`, `type`, or `negate` (the flag stores False).
    """
    metadata = {"help": help, **({"flag": flag} if flag else {}), **cli}
    return field(metadata=metadata) if default is MISSING else field(default=default, metadata=metadata)


def comma_separated(value: str) -> tuple[str, ...]:
    """"q_proj, v_proj" -> ("q_proj", "v_proj")."""
    return tuple(v.strip() for v in value.split(",") if v.strip())


def _check_int(name: str, value, low: int, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")


@dataclass
class ModelOptions:
    """Which model to fine-tune."""

    path: str = option(help="FAM checkpoint, or a base checkpoint (model_type one of: %(families)s), converted on "
                            "the fly with --block-size/--memory-segments/--fam-length, or a LoRA adapter of a FAM "
                            "checkpoint (an earlier run's output), trained further as it is: a folder or a Hub id")
    # None: the FAMSettings defaults, for a base checkpoint; a FAM checkpoint keeps its own
    block_size: int | None = option(None, "C, for a base checkpoint")
    memory_segments: int | None = option(None, "M, for a base checkpoint")
    fam_length: int | None = option(None, "F, for a base checkpoint")
    fam_layers: str | None = option(None, "all or global, for a base checkpoint")
    dtype: str = option("float32", "weights dtype (with --quantize: of the unquantized weights and of the "
                                   "computation)", "--dtype", choices=DTYPES)
    quantize: str | None = option(
        None, "load the weights quantized by bitsandbytes and train LoRA beside them (QLoRA); the adapter applies "
              "to the unquantized checkpoint (docs/training.md, 'Quantized models and QLoRA')",
        "--quantize", choices=QUANTIZATIONS,
    )
    memory_start_text: str = option(
        DEFAULT_MEMORY_START_TEXT,
        "a memory at the BOS start (hf-fam convert's default: one repeated row) is trained from slot 0 as the sink "
        "and the other slots as this text's token embeddings; '' keeps the BOS memory",
        "--memory-start-text", metavar="TEXT",
    )

    def __post_init__(self):
        self.path = str(self.path)
        _check_int("block_size", self.block_size, 1, allow_none=True)
        _check_int("memory_segments", self.memory_segments, 0, allow_none=True)
        _check_int("fam_length", self.fam_length, 0, allow_none=True)
        if self.fam_layers is not None and self.fam_layers not in FAM_LAYER_CHOICES:
            raise ValueError(f"fam_layers must be one of {', '.join(FAM_LAYER_CHOICES)}, got {self.fam_layers!r}")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}")
        if self.quantize is not None and self.quantize not in QUANTIZATIONS:
            raise ValueError(f"quantize must be one of {', '.join(QUANTIZATIONS)} or None, got {self.quantize!r}")

    def loading(self, device) -> dict:
        """load_fam_model's keywords for these options: the settings a base checkpoint is converted with, the dtype,
        and the quantization with the device it loads on (unquantized weights load on the CPU and move with the
        training)."""
        from ..runtime.loading import FAMOverrides

        return dict(overrides=FAMOverrides(self.block_size, self.memory_segments, self.fam_length, self.fam_layers),
                    dtype=self.dtype, quantize=self.quantize, device=str(device) if self.quantize else "cpu")


@dataclass
class LoraOptions:
    """LoRA settings (see `fam_lora_config`), or `full`: every weight trained instead."""

    full: bool = option(
        False, "train every weight instead of LoRA (the other LoRA options do not apply): the output is the whole "
               "FAM checkpoint, not an adapter; learnt the memory fastest in docs/training.md's probe", "--full",
    )
    train_embeddings: bool = option(
        True, "with --full: keep the token embeddings (and an LM head tied to them) frozen: a quarter of "
              "SmolLM2-135M's weights, and their optimizer state", "--freeze-embeddings", negate=True,
    )
    r: int = option(DEFAULT_LORA_RANK, "LoRA rank (the paper's)", "--lora-rank")
    alpha: int | None = option(None, "LoRA alpha (default: the rank)", "--lora-alpha")
    dropout: float = option(0.0, "LoRA dropout", "--lora-dropout")
    target_modules: tuple[str, ...] | None = option(
        None, "comma-separated module names (default: the family's q/k/v/o and gate/up/down projections)",
        "--lora-targets", type=comma_separated,
    )
    train_fam_init: bool = option(True, "do not train the initial memory fam_init", "--freeze-fam-init", negate=True)
    train_norms: bool = option(
        True, "do not train the decoder layers' normalization weights (trained in full by default: with LoRA alone "
              "the memory of a pretrained model does not learn, docs/training.md)", "--freeze-norms", negate=True,
    )
    init: str = option(
        "peft", "LoRA's start: peft (PEFT's, B = 0) or pissa (A and B from each weight's top singular vectors; "
                "learnt faster in docs/training.md's probe). The saved adapter applies to the unchanged base "
                "either way",
        "--lora-init", choices=LORA_INITS,
    )

    def __post_init__(self):
        _check_int("lora rank", self.r, 1)
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"LoRA dropout must be in [0, 1), got {self.dropout!r}")
        if self.init not in LORA_INITS:
            raise ValueError(f"LoRA init must be one of {', '.join(LORA_INITS)}, got {self.init!r}")
        if self.target_modules is not None:
            self.target_modules = tuple(self.target_modules)


@dataclass
class DataOptions:
    """Training data: packed text files, the passkey task, or both mixed (`mix`: passkey examples and packed text
    sequences shuffled together, so the task is learnt while language modelling stays trained)."""

    source: str = option("passkey", "training data: passkey, text files, or mix (both, --text-fraction of the "
                                    "sequences from the text)", "--data", choices=DATA_SOURCES)
    text_files: tuple[str, ...] = option(
        (), "text data: .txt/.md (one document per file), .json/.jsonl/.csv/.parquet rows, folders of those, or a "
            "folder saved with Dataset.save_to_disk", "--text-files", nargs="+", metavar="PATH",
    )
    text_column: str = option("text", "column holding the text (json/csv/parquet/saved datasets)", "--text-column")
    text_fraction: float = option(0.5, "with --data mix: share of the training sequences taken from the text (the "
                                       "rest are the --passkey-examples)", "--text-fraction")
    seq_len: int = option(2048, "tokens per training sequence; for text data a multiple of the block size",
                          "--seq-len")
    passkey_form: str = option("text", "passkey in words for any tokenizer, or the 33-token synthetic form for tiny "
                                       "models", "--passkey-form", choices=PASSKEY_FORMS)
    passkey_examples: int = option(2000, "passkey training examples", "--passkey-examples")
    passkey_min_seq_len: int | None = option(None, "random passkey lengths in [this, --seq-len]",
                                             "--passkey-min-seq-len")
    passkey_depth: float | None = option(None, "key depth in the filler, 0 (start) to 1 (end); default random",
                                         "--passkey-depth")
    passkey_vocab_offset: int = option(0, "first token id of the synthetic form", "--passkey-vocab-offset")
    heldout: int = option(
        DEFAULT_HELDOUT_SEQUENCES, "sequences kept out of training (at most a tenth of the data) to measure the loss "
        "on, before and after the run (0 = none)", "--heldout", metavar="N",
    )

    def __post_init__(self):
        _check_int("heldout", self.heldout, 0)
        if self.source not in DATA_SOURCES:
            raise ValueError(f"data source must be one of {', '.join(DATA_SOURCES)}, got {self.source!r}")
        self.text_files = tuple(str(p) for p in self.text_files)
        if self.source in ("text", "mix") and not self.text_files:
            raise ValueError(f"data source {self.source!r} needs text files (--text-files FILE ...).")
        if isinstance(self.text_fraction, bool) or not isinstance(self.text_fraction, (int, float)) or not (
            0.0 < self.text_fraction < 1.0
        ):
            raise ValueError(f"text_fraction must be in (0, 1), got {self.text_fraction!r}; use --data text or "
                             "--data passkey for one source only.")
        from .data import check_seq_len

        check_seq_len(self.seq_len, None)
        if self.source in ("passkey", "mix"):
            self.passkey_config()  # validates the passkey fields

    def passkey_config(self, seed: int = 0) -> PasskeyConfig:
        from ..tasks.passkey import PasskeyConfig

        return PasskeyConfig(
            num_examples=self.passkey_examples, seq_len=self.seq_len, min_seq_len=self.passkey_min_seq_len,
            depth=self.passkey_depth, form=self.passkey_form, vocab_offset=self.passkey_vocab_offset, seed=seed,
        )


@dataclass
class TrainOptions:
    """The optimisation loop and what it writes."""

    output_dir: str = option(help="output folder: adapter, logs, fam_base/, merged/; must not exist or be empty, "
                                  "unless --force", flag=("--output", "-o"))
    max_steps: int = option(100, "optimizer steps", "--steps")
    batch_size: int = option(1, "sequences per process per micro-batch", "--batch-size")
    gradient_accumulation_steps: int = option(1, "micro-batches per optimizer step", "--grad-accum")
    learning_rate: float = option(1e-4, "peak learning rate (the paper's for its 1B model, held constant)", "--lr")
    lr_scheduler: str = option("constant_with_warmup", "learning-rate schedule", "--lr-scheduler", choices=SCHEDULERS)
    warmup_steps: int = option(0, "warmup steps", "--warmup-steps")
    weight_decay: float = option(0.0, "AdamW weight decay", "--weight-decay")
    max_grad_norm: float | None = option(1.0, "gradient clipping norm (None in the API: off)", "--max-grad-norm")
    gradient_checkpointing: bool = option(False, "recompute activations (saves memory)", "--gradient-checkpointing")
    loss_chunk: int = option(0, "sum the loss over this many tokens at a time, keeping no (tokens x vocabulary) "
                                f"logits (saves memory on long sequences, e.g. {DEFAULT_LOSS_CHUNK_TOKENS}; same loss "
                                "within rounding); 0: the model's own loss", "--loss-chunk")
    seed: int = option(0, "seed for weights, data order and the recipe", "--seed")
    log_every: int = option(10, "log every N steps", "--log-every")
    save_every: int = option(0, "write a training state every N optimizer steps to OUTPUT.states/ (removed when the "
                                "run completes), to continue an interrupted run with --resume; 0: never",
                             "--save-every")
    resume: bool = option(False, "continue an interrupted run from its newest state in OUTPUT.states/, with the same "
                                 "options; it ends as the uninterrupted run would have", "--resume")
    merge: bool = option(False, "also save the LoRA-merged model to OUTPUT/merged", "--merge")
    overwrite: bool = option(False, "replace a non-empty --output folder, once this run is done (the run writes "
                                    "beside it and swaps; old and new files never mix)", "--force")
    cpu: bool = option(False, "train on CPU even where a GPU is present", "--cpu")

    def __post_init__(self):
        self.output_dir = str(self.output_dir)
        _check_int("max_steps", self.max_steps, 1)
        _check_int("batch_size", self.batch_size, 1)
        _check_int("gradient_accumulation_steps", self.gradient_accumulation_steps, 1)
        _check_int("warmup_steps", self.warmup_steps, 0)
        _check_int("log_every", self.log_every, 1)
        _check_int("save_every", self.save_every, 0)
        _check_int("loss_chunk", self.loss_chunk, 0)
        _check_int("seed", self.seed, 0)
        if not (isinstance(self.learning_rate, (int, float)) and self.learning_rate > 0):
            raise ValueError(f"learning_rate must be > 0, got {self.learning_rate!r}")
        if self.lr_scheduler not in SCHEDULERS:
            raise ValueError(f"lr_scheduler must be one of {', '.join(SCHEDULERS)}, got {self.lr_scheduler!r}")
        if self.max_grad_norm is not None and self.max_grad_norm <= 0:
            raise ValueError(f"max_grad_norm must be > 0 or None, got {self.max_grad_norm!r}")


@dataclass
class FinetuneConfig:
    """Everything `finetune` needs."""

    model: ModelOptions
    train: TrainOptions
    data: DataOptions = field(default_factory=DataOptions)
    lora: LoraOptions = field(default_factory=LoraOptions)
    recipe: FAMRecipeConfig = field(default_factory=FAMRecipeConfig)

    def __post_init__(self):
        quantize = self.model.quantize
        if quantize and self.lora.full:
            raise ValueError(f"--full trains every weight, and {quantize} weights cannot be trained: drop --quantize "
                             "(LoRA beside quantized weights is QLoRA) or --full.")
        if quantize and self.lora.init != "peft":
            raise ValueError(f"--lora-init {self.lora.init} moves part of each base weight into LoRA, which "
                             f"{quantize} weights cannot give back exactly: drop --quantize or --lora-init.")
        if not self.lora.full:
            if not self.lora.train_embeddings:
                raise ValueError("--freeze-embeddings goes with --full; LoRA does not train the embeddings.")
            return
        if self.train.merge:
            raise ValueError("--merge merges a LoRA adapter; a --full run saves the whole model already: drop --merge.")
        defaults = LoraOptions()
        full_options = ("full", "train_embeddings")
        changed = [f.metadata["flag"] for f in fields(LoraOptions)
                   if f.name not in full_options and getattr(self.lora, f.name) != getattr(defaults, f.name)]
        if changed:
            raise ValueError(f"{', '.join(changed)} set{'s' if len(changed) == 1 else ''} LoRA, which a --full run "
                             "does not use: drop " + ("it" if len(changed) == 1 else "them") + " or --full.")


def split_text(fresh: float | None, passed: float | None) -> str:
    """The loss by how the memory started, as the log and the final line show it after the whole loss: "" when no
    forward of the window started from a passed-on memory (then every loss is a fresh memory's)."""
    if passed is None:
        return ""
    return f" (fresh memory {'-' if fresh is None else f'{fresh:.4f}'}, passed memory {passed:.4f})"


@dataclass
class FinetuneResult:
    """What a run produced."""

    output_dir: Path
    steps: int
    final_loss: float  # the last log window's mean loss; split below by how each forward's memory started
    seconds: float
    world_size: int
    adapter_digests: list[str]  # of the trained weights, one per process (a --full run's: every weight)
    merged_dir: Path | None = None
    fam_base_dir: Path | None = None
    # the trained PeftModel; with merge=True, on the main process, the merged FAM model instead; a --full run's model
    model: object = field(default=None, repr=False)
    final_loss_fresh_memory: float | None = None  # forwards from fam_init (None: none in the last window)
    final_loss_passed_memory: float | None = None  # forwards from a state Random State Passing kept
    # the loss on the held-out sequences, by when: "given" (the model as given, when training changed its start),
    # "start", "final"; empty when none were held out
    heldout_losses: dict = field(default_factory=dict)
    heldout_sequences: int = 0
    text_line: str = ""  # the loss on plain text within one block, as given and trained (training/text_check.py)
