"""FAMCache: the constant-size state of a FAM stream.

Per layer it holds the keys/values of the last M complete blocks, of the current partial block, and the
layer's FAM (see `FAMLayerState`): (M+1)·C + F tokens per layer, however long the stream.
"""

from __future__ import annotations

import torch

from .fam_core import FAMLayerState, FAMSettings


class FAMCache:
    """The state a FAM model carries between calls of a stream."""

    def __init__(self, settings: FAMSettings):
        self.settings = settings
        self.layer_states: list[FAMLayerState] | None = None
        self.seen = None  # (B,) real tokens seen per row
        self.total_columns = 0  # columns of attention_mask seen (real + padding)
        self._model_id = None

    @property
    def started(self) -> bool:
        return self.layer_states is not None

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.total_columns

    def check_compatible(self, settings: FAMSettings, batch: int, model) -> None:
        if settings != self.settings:
            raise ValueError(
                f"This FAMCache was made with {self.settings}, the model runs with {settings}: "
                "start a new cache for this model."
            )
        if self.started and self.seen.shape[0] != batch:
            raise ValueError(f"This FAMCache holds {self.seen.shape[0]} rows, the input has {batch}.")
        if self._model_id is not None and self._model_id != id(model):
            raise ValueError("This FAMCache belongs to another model: start a new cache for this model.")
        self._model_id = id(model)

    def check_positions(self, position_ids, chunk_mask) -> None:
        """Positions, when given, must continue the stream (count real tokens from each row's first)."""

    def advance(self, layer_states: list[FAMLayerState], chunk_mask: torch.Tensor) -> None:
        self.layer_states = layer_states
        real = chunk_mask.long().sum(1)
        self.seen = real if self.seen is None else self.seen + real
        self.total_columns += chunk_mask.shape[1]
