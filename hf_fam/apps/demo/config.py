"""What the demo does: `DemoConfig` (the defaults of `hf-fam demo`) and `full_config` (`--full`)."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class DemoConfig:
    """Everything the demo does, with the defaults of `hf-fam demo` (see `full_config` for `--full`)."""

    seed: int = field(default=0, metadata={"help": "Seed of weights, data and evaluation."})
    # model
    hidden_size: int = 128
    intermediate_size: int = 256
    num_layers: int = 2
    num_heads: int = 4
    # FAM
    block_size: int = 32
    memory_segments: int = 1
    fam_length: int = 16
    # 1. short-context model (full attention, shared)
    pretrain_len: int = field(default=64, metadata={"help": "Sequence length of the short-context model."})
    pretrain_steps: int = field(default=3000, metadata={"help": "At most this many steps."})
    pretrain_stop_at: float = field(default=0.98, metadata={"help": "Stop once training exact match reaches it."})
    pretrain_lrs: tuple[float, ...] = field(
        default=(1e-3, 2e-3),
        metadata={"help": "Learning rates raced from the same initial weights (one process each); the first, in "
                          "steps, to reach pretrain_stop_at gives the short-context model."},
    )
    # 2. fine-tuning (FAM and BSWA alike)
    max_steps: int | None = field(default=750, metadata={"help": "Fine-tuning steps per model."})
    train_seconds: float = field(default=660.0, metadata={"help": "Cap on fine-tuning wall time per model."})
    batch_size: int = 32
    lr: float = 1e-3
    min_lr_ratio: float = 0.05
    warmup_steps: int = 50
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    state_passing_prob: float = field(default=0.0, metadata={"help": "Random State Passing probability."})
    short_batch_prob: float = field(
        default=0.2, metadata={"help": "Share of fine-tuning batches at the short-context length (keeps it sharp)."}
    )
    far_key_prob: float = field(
        default=0.5, metadata={"help": "Share of training examples whose key sits beyond reach (see far_key_anywhere)."}
    )
    near_key_prob: float = field(
        default=0.25, metadata={"help": "Share of training examples whose key sits in the last attention window."}
    )
    far_key_anywhere: bool = field(
        default=True, metadata={"help": "Far keys anywhere beyond reach of the query, not only in the first block."}
    )
    device: str = "cpu"
    # adaptive curriculum over training lengths
    start_len: int = 96
    len_step: int = 32
    max_train_len: int = 384
    promote_at: float = 0.7
    # evaluation
    eval_multiples: tuple[float, ...] = (1, 2, 4, 8, 16)
    eval_trials: int = 200
    eval_batch_size: int = 50
    threads_per_model: int = 1
    log_every: int = field(default=0, metadata={"help": "Print fine-tuning progress every this many steps (0: never)."})
    fam_threads: int | None = field(
        default=None, metadata={"help": "Threads of the FAM fine-tuning process (default threads_per_model)."}
    )

    def __post_init__(self):
        if self.start_len > self.max_train_len:
            raise ValueError(f"start_len {self.start_len} > max_train_len {self.max_train_len}")
        if self.far_key_prob + self.near_key_prob > 1:
            raise ValueError("far_key_prob + near_key_prob must be <= 1")

    @property
    def window(self) -> int:
        return self.block_size * (self.memory_segments + 1)


def full_config(seed: int = 0) -> DemoConfig:
    """The long run (`hf-fam demo --full`): fine-tuning up to 16x the window (32 minutes on 2 cores).

    1,200 steps with the curriculum up to 1,024 tokens (16x the window); seed 0 reached 1,024 tokens after
    ~450 steps and then 100 % beyond reach at 16x. BSWA stays at short lengths and finishes early, so the
    FAM process gets both cores (it shares them with BSWA for the first minutes). A 2-hour cap on the
    fine-tuning time only matters on a much slower machine (the learning-rate schedule follows the steps).
    """
    return DemoConfig(seed=seed, max_steps=1200, train_seconds=2 * 3600, max_train_len=1024, fam_threads=2,
                      log_every=100)
