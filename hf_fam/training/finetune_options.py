"""What `finetune` takes and returns: `FinetuneConfig` (model, data, LoRA, recipe and loop options) and
`FinetuneResult`. Split from `finetune.py`, which holds the loop."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from ..modeling.fam_settings import FAM_LAYER_CHOICES
from ..tasks.passkey import PASSKEY_FORMS, PasskeyConfig
from .data import check_seq_len
from .lora import DEFAULT_LORA_RANK
from .recipe import FAMRecipeConfig

DTYPES = ("float32", "bfloat16", "float16", "auto")
DATA_SOURCES = ("passkey", "text")
SCHEDULERS = ("constant", "constant_with_warmup", "linear", "cosine")

def _check_int(name: str, value, low: int, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")


@dataclass
class ModelOptions:
    """Which model to fine-tune."""

    path: str = field(metadata={"help": "A FAM checkpoint, or a base checkpoint (Llama, Mistral, Gemma, ...) "
                                        "to convert on the fly: a folder or a Hub id."})
    block_size: int | None = field(default=None, metadata={"help": "C for a base checkpoint (default 1024)."})
    memory_segments: int | None = field(default=None, metadata={"help": "M for a base checkpoint (default 3)."})
    fam_length: int | None = field(default=None, metadata={"help": "F for a base checkpoint (default 64)."})
    fam_layers: str | None = field(default=None, metadata={"help": "'all' or 'global', for a base checkpoint "
                                                                  "(default 'all')."})
    dtype: str = field(default="float32", metadata={"help": f"Weights dtype: {', '.join(DTYPES)}."})

    def __post_init__(self):
        self.path = str(self.path)
        _check_int("block_size", self.block_size, 1, allow_none=True)
        _check_int("memory_segments", self.memory_segments, 0, allow_none=True)
        _check_int("fam_length", self.fam_length, 0, allow_none=True)
        if self.fam_layers is not None and self.fam_layers not in FAM_LAYER_CHOICES:
            raise ValueError(f"fam_layers must be one of {', '.join(FAM_LAYER_CHOICES)}, got {self.fam_layers!r}")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}")


@dataclass
class LoraOptions:
    """LoRA settings (see `fam_lora_config`)."""

    r: int = field(default=DEFAULT_LORA_RANK, metadata={"help": "LoRA rank (paper: 64)."})
    alpha: int | None = field(default=None, metadata={"help": "LoRA alpha (default: the rank)."})
    dropout: float = field(default=0.0, metadata={"help": "Dropout on the LoRA branch."})
    target_modules: tuple[str, ...] | None = field(
        default=None, metadata={"help": "Modules to adapt (default: the family's attention and MLP projections)."}
    )
    train_fam_init: bool = field(default=True, metadata={"help": "Train the initial memory fam_init with the adapter."})

    def __post_init__(self):
        _check_int("lora rank", self.r, 1)
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"LoRA dropout must be in [0, 1), got {self.dropout!r}")
        if self.target_modules is not None:
            self.target_modules = tuple(self.target_modules)


@dataclass
class DataOptions:
    """Training data: packed text files, or the passkey task."""

    source: str = field(default="passkey", metadata={"help": f"One of {', '.join(DATA_SOURCES)}."})
    text_files: tuple[str, ...] = field(default=(), metadata={"help": "Text data (source 'text')."})
    text_column: str = field(default="text", metadata={"help": "Column holding the text in json/csv/parquet data."})
    seq_len: int = field(default=2048, metadata={"help": "Tokens per training sequence (text: a multiple of C)."})
    passkey_form: str = field(default="text", metadata={"help": f"Passkey form: {', '.join(PASSKEY_FORMS)}."})
    passkey_examples: int = field(default=2000, metadata={"help": "Passkey training examples."})
    passkey_min_seq_len: int | None = field(default=None, metadata={"help": "Random passkey lengths from here."})
    passkey_depth: float | None = field(default=None, metadata={"help": "Key depth in [0, 1]; default random."})
    passkey_vocab_offset: int = field(default=0, metadata={"help": "First token id of the synthetic passkey form."})

    def __post_init__(self):
        if self.source not in DATA_SOURCES:
            raise ValueError(f"data source must be one of {', '.join(DATA_SOURCES)}, got {self.source!r}")
        self.text_files = tuple(str(p) for p in self.text_files)
        if self.source == "text" and not self.text_files:
            raise ValueError("data source 'text' needs text files (--text-files FILE ...).")
        check_seq_len(self.seq_len, None)
        if self.source == "passkey":
            self.passkey_config()  # validates the passkey fields

    def passkey_config(self, seed: int = 0) -> PasskeyConfig:
        return PasskeyConfig(
            num_examples=self.passkey_examples, seq_len=self.seq_len, min_seq_len=self.passkey_min_seq_len,
            depth=self.passkey_depth, form=self.passkey_form, vocab_offset=self.passkey_vocab_offset, seed=seed,
        )


@dataclass
class TrainOptions:
    """The optimisation loop and what it writes."""

    output_dir: str = field(metadata={"help": "Where the adapter, logs and optional merged model go."})
    max_steps: int = field(default=100, metadata={"help": "Optimizer steps."})
    batch_size: int = field(default=1, metadata={"help": "Sequences per process per micro-batch."})
    gradient_accumulation_steps: int = field(default=1, metadata={"help": "Micro-batches per optimizer step."})
    learning_rate: float = field(default=1e-4, metadata={"help": "Peak learning rate (paper, 1B: 1e-4, constant)."})
    lr_scheduler: str = field(default="constant_with_warmup", metadata={"help": f"One of {', '.join(SCHEDULERS)}."})
    warmup_steps: int = field(default=0, metadata={"help": "Linear warmup steps."})
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW weight decay."})
    max_grad_norm: float | None = field(default=1.0, metadata={"help": "Gradient clipping (None: off)."})
    gradient_checkpointing: bool = field(default=False, metadata={"help": "Recompute activations in backward."})
    seed: int = field(default=0, metadata={"help": "Seed for weights, data and the recipe."})
    log_every: int = field(default=10, metadata={"help": "Log every N optimizer steps."})
    merge: bool = field(default=False, metadata={"help": "Also save the merged model to output_dir/merged."})
    overwrite: bool = field(default=False, metadata={"help": "Replace a non-empty output_dir once the run is done."})
    cpu: bool = field(default=False, metadata={"help": "Train on CPU even where a GPU is present."})

    def __post_init__(self):
        self.output_dir = str(self.output_dir)
        _check_int("max_steps", self.max_steps, 1)
        _check_int("batch_size", self.batch_size, 1)
        _check_int("gradient_accumulation_steps", self.gradient_accumulation_steps, 1)
        _check_int("warmup_steps", self.warmup_steps, 0)
        _check_int("log_every", self.log_every, 1)
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


@dataclass
class FinetuneResult:
    """What a run produced."""

    output_dir: Path
    steps: int
    final_loss: float
    seconds: float
    world_size: int
    adapter_digests: list[str]
    merged_dir: Path | None = None
    fam_base_dir: Path | None = None
    # the trained PeftModel; with merge=True, on the main process, the merged FAM model instead
    model: object = field(default=None, repr=False)
