"""FAM settings: block size C, memory segments M, FAM length F, and which layers hold FAM (DESIGN.md §1).

Kept apart from the computation (`fam_core`) so that the configuration validates its values without
importing the block attention.
"""

from __future__ import annotations

from dataclasses import dataclass

# Paper defaults (DESIGN.md §4); here, not in configuration_fam, so the command line reads them without torch
DEFAULT_BLOCK_SIZE = 1024
DEFAULT_MEMORY_SEGMENTS = 3
DEFAULT_FAM_LENGTH = 64


@dataclass(frozen=True)
class FAMSettings:
    """Block size C, memory segments M, FAM length F (DESIGN.md §1)."""

    block_size: int
    memory_segments: int
    fam_length: int
    fam_layers: str = "all"  # "all", or "global": layers the checkpoint runs with a sliding window get no FAM

    def __post_init__(self):
        validate_fam_settings(self.block_size, self.memory_segments, self.fam_length, self.fam_layers)

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
