"""FAM settings: block size C, memory segments M, FAM length F, and which layers hold FAM (docs/design.md §1).

Kept apart from the computation (`fam_core`) so that the configuration validates its values without
importing the block attention.
"""

from __future__ import annotations

from dataclasses import dataclass

# Paper defaults (docs/design.md §4): the one place they are written; this module imports no torch, so the
# command line reads them before loading anything
DEFAULT_BLOCK_SIZE = 1024
DEFAULT_MEMORY_SEGMENTS = 3
DEFAULT_FAM_LENGTH = 64
DEFAULT_FAM_LAYERS = "all"
DEFAULT_FAM_UPDATE = "paper"  # what a config without the field means
ZERO_SHOT_FAM_UPDATE = "sink"  # where `hf-fam convert` and `hf_fam.patch` start an untrained memory
# tokens per forward where hf_fam reads a long input through the cache (streaming, generate, eval)
DEFAULT_CHUNK_TOKENS = 4096
# tokens per logits computation where a training loss is summed in chunks (`fam_loss_chunk`, `--loss-chunk`)
DEFAULT_LOSS_CHUNK_TOKENS = 1024


@dataclass(frozen=True)
class FAMSettings:
    """The FAM settings of a model, read everywhere from the CLI down to the cache (docs/design.md §1).

    Args:
        block_size: C, tokens per block.
        memory_segments: M, previous blocks each block attends to.
        fam_length: F, FAM tokens per layer (0 = block sliding window attention).
        fam_layers: "all", or "global": layers the checkpoint runs with a sliding window get no FAM.
        fam_update: "paper" (the update of §1 after every block) or "sink" (the zero-shot start; see
            FAM_UPDATE_CHOICES).

    Example:
    ```python
    >>> FAMSettings(block_size=256, memory_segments=1, fam_length=16).attention_window
    512
    ```
    """

    block_size: int = DEFAULT_BLOCK_SIZE
    memory_segments: int = DEFAULT_MEMORY_SEGMENTS
    fam_length: int = DEFAULT_FAM_LENGTH
    fam_layers: str = DEFAULT_FAM_LAYERS
    fam_update: str = DEFAULT_FAM_UPDATE

    def __post_init__(self):
        validate_fam_settings(self.block_size, self.memory_segments, self.fam_length, self.fam_layers)
        validate_fam_update(self.fam_update)

    @classmethod
    def of(cls, config) -> FAMSettings:
        """The settings a FAMConfig (or any object with the four fields) holds."""
        return cls(config.block_size, config.memory_segments, config.fam_length,
                   getattr(config, "fam_layers", DEFAULT_FAM_LAYERS), getattr(config, "fam_update", DEFAULT_FAM_UPDATE))

    def as_kwargs(self) -> dict:
        """The fields as keyword arguments (for FAMConfig, `patch`, `from_base_model`)."""
        return {"block_size": self.block_size, "memory_segments": self.memory_segments,
                "fam_length": self.fam_length, "fam_layers": self.fam_layers, "fam_update": self.fam_update}

    def describe(self) -> str:
        """One line naming every setting, for messages."""
        return (f"block_size={self.block_size}, memory_segments={self.memory_segments}, "
                f"fam_length={self.fam_length}, fam_layers={self.fam_layers!r}, fam_update={self.fam_update!r}")

    @property
    def cache_tokens(self) -> int:
        """K/V entries per layer a stream's cache holds: M blocks, the partial block, the FAM."""
        return (self.memory_segments + 1) * self.block_size + self.fam_length

    @property
    def frame_origin(self) -> int:
        """P0: position of a block's first token in its own frame (all frame positions are >= 0)."""
        return max(self.memory_segments * self.block_size, self.fam_length)

    @property
    def attention_window(self) -> int:
        """Tokens a block token can see directly: its block and the M memory blocks."""
        return self.block_size * (self.memory_segments + 1)


FAM_LAYER_CHOICES = ("all", "global")


def validate_fam_settings(block_size, memory_segments, fam_length, fam_layers="all") -> None:
    """Raise a ValueError naming the bad value and the rule."""
    if fam_layers not in FAM_LAYER_CHOICES:
        raise ValueError(f"fam_layers must be one of {', '.join(FAM_LAYER_CHOICES)}, got {fam_layers!r}")
    for name, value, low in (("block_size", block_size, 1), ("memory_segments", memory_segments, 0),
                             ("fam_length", fam_length, 0)):
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"{name} must be an integer, got {value!r}")
        if value < low:
            raise ValueError(f"{name} must be >= {low}, got {value}")


# How the memory evolves between blocks.
# "paper": docs/design.md §1 (Algorithm 2): after every complete block the FAM is updated by the layer itself.
# "sink": the zero-shot start of a converted checkpoint, before any training. The memory keeps its initial
#     value (fam_init propagated through the layers, no update), and block tokens read only its first slot:
#     an attention sink the window never loses. An untrained model's update overwrites that sink (measured in
#     README "Zero-shot"), and F identical sink slots take F times one sink's share of attention; fine-tuning
#     switches to "paper".
FAM_UPDATE_CHOICES = ("paper", "sink")


def validate_fam_update(fam_update) -> None:
    if fam_update not in FAM_UPDATE_CHOICES:
        raise ValueError(f"fam_update must be one of {', '.join(FAM_UPDATE_CHOICES)}, got {fam_update!r}")


def adapter_bases_unlike_training(model) -> list[tuple[str, str, str]]:
    """(adapter name, base, what the base is) for each PEFT adapter on `model` (a FAM model: a PeftModel's inner
    model, or one with transformers' `add_adapter`) whose named base would not run what training runs: a FAM
    checkpoint in the zero-shot start ("zero-shot": its config.json says fam_update "sink", and training runs the
    paper's update) or a checkpoint that is not a FAM checkpoint at all ("plain": the adapter would load on it
    without FAM). The config.json is read from the folder or the local Hub cache, never the network; a base not
    readable there is not judged."""
    import json
    import os

    found = []
    for name, config in (getattr(model, "peft_config", None) or {}).items():
        base = getattr(config, "base_model_name_or_path", None)
        if not base:
            continue
        path = os.path.join(os.path.expanduser(str(base)), "config.json")
        if not os.path.isfile(path):
            from transformers.utils import cached_file

            try:
                path = cached_file(str(base), "config.json", local_files_only=True,
                                   _raise_exceptions_for_missing_entries=False,
                                   _raise_exceptions_for_connection_errors=False)
            except (OSError, ValueError):
                path = None
        try:
            with open(path) as f:
                saved = json.load(f)
        except (OSError, TypeError, ValueError):
            continue  # not readable here: nothing to say
        if saved.get("model_type") != "fam":
            found.append((name, str(base), "plain"))
        elif saved.get("fam_update") == ZERO_SHOT_FAM_UPDATE:
            found.append((name, str(base), "zero-shot"))
    return found
