"""FAMCache: the constant-size state of a FAM stream, as a transformers `Cache`.

Per layer it holds the keys/values of the last M complete blocks, of the current partial block, and the
layer's FAM (see `FAMLayerState`): (M+1)·C + F tokens per layer and row, however long the stream.
`model(ids, use_cache=True)` returns one; passing it back with the next chunk continues the stream, and
`generate()` creates and carries it by itself (it replaces the empty DynamicCache generate makes).
"""

from __future__ import annotations

import torch
from transformers.cache_utils import Cache

from .fam_settings import FAMSettings
from .fam_state import FAMLayerState

_STATE_FIELDS = ("win_k", "win_v", "mem_blocks", "part_len", "fam")


class FAMCache(Cache):
    """The state a FAM model carries between calls of a stream.

    Args:
        settings: the model's FAMSettings; taken from the model on first use when omitted.

    Example:
    ```python
    >>> cache = None
    >>> for chunk in chunks:                       # any chunk sizes, any number of chunks
    ...     out = model(chunk, cache=cache, use_cache=True)
    ...     cache = out.cache                      # constant size
    ```
    """

    def __init__(self, settings: FAMSettings | None = None):
        super().__init__(layers=[])
        self.settings = settings
        self.layer_states: list[FAMLayerState] | None = None
        self.seen: torch.Tensor | None = None  # (B,) real tokens seen per row
        self.next_position: torch.Tensor | None = None  # (B,) position the next real token must have
        self.total_columns = 0  # attention_mask columns seen (real tokens and padding)
        self._owner: int | None = None

    # --- what transformers asks of a Cache ------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.layer_states) if self.layer_states is not None else 0

    def __repr__(self) -> str:
        return f"FAMCache(settings={self.settings}, layers={len(self)}, tokens={self.total_columns})"

    @property
    def started(self) -> bool:
        return self.layer_states is not None

    def get_seq_length(self, layer_idx: int = 0) -> int:
        """Columns of input consumed so far (what `generate` slices new tokens by)."""
        return self.total_columns

    def get_max_length(self, layer_idx: int | None = None) -> int:
        return -1  # a stream has no maximum length

    def get_mask_sizes(self, query_length: int, layer_idx: int = 0) -> tuple[int, int]:
        return query_length, 0  # FAM builds its own masks

    @property
    def is_compileable(self) -> bool:
        return False

    @property
    def is_initialized(self) -> bool:
        return self.started

    @property
    def is_croppable(self) -> bool:
        return False

    @property
    def is_sliding(self) -> list[bool]:
        return [False] * max(len(self), 1)

    @property
    def is_linear(self) -> list[bool]:
        return [False] * max(len(self), 1)

    @property
    def is_dummy(self) -> list[bool]:
        return [False] * max(len(self), 1)

    @property
    def batch_size(self) -> int:
        return -1 if self.seen is None else self.seen.shape[0]

    def reset(self) -> None:
        self.layer_states = None
        self.seen = self.next_position = None
        self.total_columns = 0

    def crop(self, tokens_to_remove: int) -> None:
        raise NotImplementedError(
            "A FAMCache cannot be rolled back: the FAM has already absorbed the tokens. "
            "Assisted / speculative decoding is not supported with FAM models."
        )

    def _map_rows(self, fn) -> None:
        if not self.started:
            return
        for state in self.layer_states:
            for name in _STATE_FIELDS:
                value = getattr(state, name)
                if value is not None:
                    setattr(state, name, fn(value))
        self.seen = fn(self.seen)
        self.next_position = fn(self.next_position)

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        """Beam search: keep the rows of the selected beams."""
        self._map_rows(lambda t: t.index_select(0, beam_idx.to(t.device)))

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._map_rows(lambda t: t.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._map_rows(lambda t: t[indices])

    def nbytes(self) -> int:
        """Bytes held by the cached tensors (constant over a stream)."""
        total = 0
        for state in self.layer_states or []:
            for name in _STATE_FIELDS:
                value = getattr(state, name)
                if value is not None:
                    total += value.numel() * value.element_size()
        return total

    # --- used by the FAM forward ---------------------------------------------------------------------
    def check_compatible(self, settings: FAMSettings, batch: int, model) -> None:
        """Refuse a cache made for another model, other C/M/F, or another batch."""
        if self.settings is None:
            self.settings = settings
        if settings != self.settings:
            raise ValueError(
                f"This FAMCache was made with {self.settings.describe()}; the model runs with "
                f"{settings.describe()}. Start a new cache for this model."
            )
        if self._owner is not None and self._owner != id(model):
            raise ValueError("This FAMCache belongs to another model: start a new cache for this model.")
        self._owner = id(model)
        if self.started and self.seen.shape[0] != batch:
            raise ValueError(f"This FAMCache holds {self.seen.shape[0]} rows, the input has {batch}.")

    def check_continuation(self, attention_mask: torch.Tensor | None, chunk_mask: torch.Tensor, position_ids) -> None:
        """The chunk must continue the stream: its mask's past columns and its positions agree with the cache.
        Checked on the device and read once (on CUDA each read waits for the device: decoding reads per step)."""
        n = chunk_mask.shape[1]
        checks = {}
        if attention_mask is not None and self.started and attention_mask.shape[1] == self.total_columns + n:
            past_real = attention_mask[:, : self.total_columns].to(torch.long).sum(1).to(self.seen.device)
            checks["mask"] = (past_real == self.seen).all()
        expected = self.next_position if self.started else None
        if position_ids is not None:
            checks.update(position_checks(position_ids, chunk_mask, expected))
        failed = failed_checks(checks)
        if "mask" in failed:
            raise ValueError(
                "attention_mask's past columns do not match the tokens this FAMCache has seen "
                f"(real tokens per row: mask {past_real.tolist()}, cache {self.seen.tolist()})."
            )
        if failed:
            raise position_error(failed[0], position_ids, chunk_mask, expected)

    def advance(self, layer_states: list[FAMLayerState], chunk_mask: torch.Tensor, position_ids=None) -> None:
        """Take the layers' new states after a chunk."""
        self.layer_states = layer_states
        real = chunk_mask.to(torch.long).sum(1)
        if self.seen is None:
            self.seen = torch.zeros_like(real)
            if position_ids is not None:
                first = _first_real_position(position_ids, chunk_mask)
                self.next_position = torch.where(real > 0, first, 0)
            else:
                self.next_position = torch.zeros_like(real)
        self.seen = self.seen + real
        self.next_position = self.next_position + real
        self.total_columns += chunk_mask.shape[1]


def _first_real_position(position_ids: torch.Tensor, chunk_mask: torch.Tensor) -> torch.Tensor:
    position_ids = position_ids.expand(chunk_mask.shape[0], -1).to(chunk_mask.device)
    big = torch.iinfo(torch.long).max
    return torch.where(chunk_mask, position_ids.long(), big).min(1).values


def failed_checks(checks: dict[str, torch.Tensor]) -> list[str]:
    """The names of the checks (0-dim bool tensors, True when they hold) that fail, read in one host read."""
    if not checks:
        return []
    held = torch.stack([c.to(torch.bool) for c in checks.values()]).tolist()
    return [name for name, ok in zip(checks, held) if not ok]


def position_checks(position_ids: torch.Tensor, chunk_mask: torch.Tensor,
                    expected_first: torch.Tensor | None) -> dict[str, torch.Tensor]:
    """Checks of a chunk's position_ids, on the device (see `failed_checks`): the real tokens' positions are
    consecutive ("consecutive") and, when `expected_first` is given, continue the stream ("continues")."""
    if position_ids.dim() != 2 or position_ids.shape[-1] != chunk_mask.shape[1]:
        raise ValueError(f"position_ids must have shape (batch, {chunk_mask.shape[1]}), "
                         f"got {tuple(position_ids.shape)}.")
    pos = position_ids.expand(chunk_mask.shape[0], -1).to(chunk_mask.device).long()
    rank = chunk_mask.long().cumsum(1) - 1
    first = _first_real_position(pos, chunk_mask)
    checks = {"consecutive": (torch.where(chunk_mask, pos - rank - first[:, None], 0) == 0).all()}
    if expected_first is not None:
        checks["continues"] = ~(_skips(first, chunk_mask, expected_first)).any()
    return checks


def _skips(first: torch.Tensor, chunk_mask: torch.Tensor, expected_first: torch.Tensor) -> torch.Tensor:
    """(B,) rows whose first real position is not the stream's next one."""
    return chunk_mask.any(1) & (first != expected_first.to(first.device))


def position_error(check: str, position_ids: torch.Tensor, chunk_mask: torch.Tensor,
                   expected_first: torch.Tensor | None) -> ValueError:
    """The error for a failed `position_checks` check."""
    if check == "consecutive":
        return ValueError(
            "position_ids of the real tokens must be consecutive (FAM counts positions from each row's first real "
            "token, padding excluded); leave position_ids out to let FAM number them."
        )
    pos = position_ids.expand(chunk_mask.shape[0], -1).to(chunk_mask.device).long()
    first = _first_real_position(pos, chunk_mask)
    b = int(_skips(first, chunk_mask, expected_first).nonzero()[0, 0])
    direction = "go backwards" if first[b] < expected_first[b] else "skip ahead"
    return ValueError(
        f"position_ids {direction} in row {b}: the stream's next position is {int(expected_first[b])}, "
        f"the chunk starts at {int(first[b])}. Continue from the cache's position or start a new cache."
    )


def check_positions(position_ids: torch.Tensor, chunk_mask: torch.Tensor, expected_first: torch.Tensor | None):
    """Real tokens' positions must be consecutive, and continue the stream when a cache is given."""
    failed = failed_checks(position_checks(position_ids, chunk_mask, expected_first))
    if failed:
        raise position_error(failed[0], position_ids, chunk_mask, expected_first)
