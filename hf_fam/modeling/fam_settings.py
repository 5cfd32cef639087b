"""FAM settings: block size C, memory segments M, FAM length F, and which layers hold FAM (DESIGN.md §1).

Kept apart from the computation (`fam_core`) so that the configuration validates its values without
importing the block attention.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class FAMSettings:
    """Block size C, memory segments M, FAM length F (DESIGN.md §1)."""

    block_size: int
    memory_segments: int
    fam_length: int
    fam_layers: str = "all"  # "all", or "global": layers the checkpoint runs with a sliding window get no FAM
    fam_update: str = "paper"  # "paper", or "sink": the zero-shot start (see FAM_UPDATE_CHOICES)

    def __post_init__(self):
        validate_fam_settings(self.block_size, self.memory_segments, self.fam_length, self.fam_layers)
        validate_fam_update(self.fam_update)

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
    for name, value, low in (("block_size", block_size, 1), ("memory_segments", memory_segments, 0), ("fam_length", fam_length, 0)):
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"{name} must be an integer, got {value!r}")
        if value < low:
            raise ValueError(f"{name} must be >= {low}, got {value}")


# How the memory evolves between blocks.
# "paper": DESIGN.md section 1 (Algorithm 2): after every complete block the FAM is updated by the layer itself.
# "sink": the zero-shot start of a converted checkpoint, before any training. The memory keeps its initial
#     value (fam_init propagated through the layers, no update), and block tokens read only its first slot:
#     an attention sink the window never loses. An untrained model's update overwrites that sink (measured in
#     README "Zero-shot"), and F identical sink slots take F times one sink's share of attention; fine-tuning
#     switches to "paper".
FAM_UPDATE_CHOICES = ("paper", "sink")


def validate_fam_update(fam_update) -> None:
    if fam_update not in FAM_UPDATE_CHOICES:
        raise ValueError(f"fam_update must be one of {', '.join(FAM_UPDATE_CHOICES)}, got {fam_update!r}")
