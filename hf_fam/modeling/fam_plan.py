"""The plan of one FAM forward (docs/design.md §1): where the chunk's tokens lie on the block timeline.

`make_plan` builds a `FAMPlan` once per forward, before the decoder runs, from the settings, the chunk's
padding mask and the incoming states. It is the same for every layer (it depends on which tokens are real
and where the stream stands, never on a layer's keys/values) and immutable: the block attention
(`fam_block_attention`) and the FAM chain (`fam_chain`) read it; what changes during the forward (the
per-layer states) lives in `FAMRun` (`fam_core`).

The *working timeline* of a row is its current (partial) block carried in from the cache, followed by the
chunk's real tokens, cut into blocks of C: working block t holds slots t·C .. t·C + C - 1. In front of it
lie the M memory blocks from the cache: the *timeline* is [M memory blocks | T working blocks].
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .fam_adapters import DecoderAdapter
from .fam_graphs import graphs_usable
from .fam_settings import FAMSettings
from .fam_state import FAMLayerState, WindowLayout

# The shape of a *regular* block (see `classify_blocks`): (m, fam_on) = its m filled memory blocks, and
# whether every row reads the FAM (True) or none does (False). An irregular block has shape None.
BlockShape = tuple[int, bool]


@dataclass(frozen=True, eq=False)
class FAMPlan:
    """The layout of one forward's chunk, shared by all layers. B = batch, n = chunk length (padding
    included), T = `num_blocks`, C/M/F = block size, memory segments, FAM length of the settings."""

    settings: FAMSettings
    fam_lengths: tuple[int, ...]  # per layer: F, or 0 where the layer holds no FAM (fam_layers="global")
    layouts: tuple[WindowLayout, ...]  # per layer: offsets of the cache's window buffer for that F
    batch: int  # B
    n: int  # columns of the chunk, padding included
    fresh: bool  # no incoming state: the chunk starts a sequence
    keep_state: bool  # the layers leave their updated state for the cache
    use_graphs: bool  # the chain may replay its update steps from CUDA graphs (`fam_graphs`)
    graphs_requested: bool  # the forward asked for graphs (training may replay its steps without autograd)
    slot: torch.Tensor  # (B, n) long: each real token's index on the working timeline; -1 for padding
    work_len: torch.Tensor  # (B,) long: tokens on the working timeline (carried partial block + real tokens)
    complete_blocks: torch.Tensor  # (B,) long: complete working blocks, work_len // C
    num_blocks: int  # T = max(1, ceil(max(work_len) / C)): working blocks of the longest row
    min_complete: int  # min over rows of complete_blocks
    max_complete: int  # max over rows of complete_blocks
    aligned: bool  # slot == column index for every real token (padding trails, chunk starts a block)
    compact: bool  # T == 1: queries stay in token order (decode, short chunks)
    in_block: bool  # a continuing chunk that completes no block: attend to the cached window as it is
    position_ids: torch.Tensor  # (B, n) long: frame positions P0 + slot % C (+ offset); P0 for padding
    fam_position_ids: torch.Tensor | None  # (1 or B, F) long: P0-F .. P0-1 (+ offset); None when F == 0
    fam_reference: torch.Tensor | None  # (B, F, D): a FAM tensor the rotary embedding takes dtype/device from
    blocks_before: torch.Tensor  # (B,) long: complete blocks before this chunk, capped at M + 1
    timeline_ok: torch.Tensor | None  # (B, (M+T)*C) bool: timeline slots holding a real token; None in_block
    block_shapes: tuple[BlockShape | None, ...]  # (T,) per working block (see `classify_blocks`)

    # --- which FAM slots block tokens read ---------------------------------------------------------
    def fam_visible(self, fam_length: int, device) -> torch.Tensor:
        """(F,) bool: which FAM slots block tokens read (all of them; only the first with fam_update "sink")."""
        visible = torch.ones(fam_length, dtype=torch.bool, device=device)
        if self.settings.fam_update == "sink":
            visible[1:] = False
        return visible

    def fam_visible_count(self, fam_length: int) -> int:
        """How many FAM slots block tokens read: the leading True entries of `fam_visible` (no device sync)."""
        return min(fam_length, 1) if self.settings.fam_update == "sink" else fam_length

    def sink_readable(self, t0: int, t1: int) -> torch.Tensor:
        """(B, t1 - t0) bool: with fam_update "sink", whether blocks t0..t1-1 of this chunk read the sink: only
        once the sequence's first block (with the real BOS) has left their window, as attention sinks are
        kept in StreamingLLM. So a prompt within the window is computed exactly as by the base model."""
        return _sink_readable(self.blocks_before, self.settings.memory_segments, t0, t1)

    def fam_visible_blocks(self, fam_length: int, t0: int, t1: int, device) -> torch.Tensor:
        """(B, t1 - t0, F) bool: the FAM slots blocks t0..t1-1 of this chunk read."""
        visible = self.fam_visible(fam_length, device)[None, None, :]
        if self.settings.fam_update != "sink":
            return visible.expand(self.batch, t1 - t0, fam_length)
        return visible & self.sink_readable(t0, t1)[:, :, None]


def make_plan(
    *,
    settings: FAMSettings,
    adapter: DecoderAdapter,
    decoder: torch.nn.Module,
    chunk_mask: torch.Tensor,
    fam_init: torch.Tensor | None,
    states: list[FAMLayerState] | None,
    keep_state: bool,
    fam_state: list[torch.Tensor] | None,
    position_offset: torch.Tensor | None,
    cuda_graphs: bool,
) -> FAMPlan:
    """Lay out one chunk (arguments as `FAMRun.start`'s)."""
    C, M, F = settings.block_size, settings.memory_segments, settings.fam_length
    num_layers = len(adapter.layers(decoder))
    batch, n = chunk_mask.shape
    device = chunk_mask.device
    fresh = states is None

    # 1. which layers hold FAM, and their window buffers
    fam_lengths = tuple(
        F if settings.fam_layers == "all" or adapter.is_global_layer(decoder, i) else 0 for i in range(num_layers)
    )
    if F > 0 and not any(fam_lengths):
        raise ValueError("fam_layers='global', but this model has no global (full-attention) layer to hold FAM.")
    layouts = tuple(WindowLayout(C, M, f) for f in fam_lengths)

    # 2. every real token's slot on the working timeline (the current block starts at 0)
    part_len = torch.zeros(batch, dtype=torch.long, device=device) if fresh else states[0].part_len
    rank = chunk_mask.long().cumsum(1) - 1
    slot = torch.where(chunk_mask, part_len[:, None] + rank, -1)  # (B, n)
    work_len = part_len + chunk_mask.long().sum(1)  # (B,)

    # 3. the chunk's block counts, whether its padding only trails, whether a row carries a partial block in: one
    #    host read for all of them (on CUDA each read waits for the device)
    trails = (chunk_mask[:, :-1] >= chunk_mask[:, 1:]).all() if n > 1 else chunk_mask.new_ones(())
    host = torch.cat([work_len, torch.stack([trails, part_len.any()]).long()]).tolist()
    work_len_cpu, prefix_shaped, carried = host[:batch], bool(host[batch]), bool(host[batch + 1])
    at_boundary = fresh or not carried
    num_blocks = max(1, math.ceil(max(work_len_cpu) / C))
    complete = [w // C for w in work_len_cpu]
    max_complete = max(complete)

    # 4. frame positions of the chunk's tokens
    P0 = settings.frame_origin
    offset = 0 if position_offset is None else position_offset.to(device=device, dtype=torch.long)[:, None]
    position_ids = torch.where(chunk_mask, P0 + slot.clamp(min=0) % C, P0) + offset  # (B, n)

    # 5. frame positions of the FAM (the last F positions before a block), and a FAM tensor for its rotary
    if fresh and fam_state is not None:
        if len(fam_state) != num_layers:
            raise ValueError(f"fam_state has {len(fam_state)} entries, the model has {num_layers} layers.")
        fam_init = next((f for f in fam_state if f is not None), None)
    fam_position_ids = fam_reference = None
    if F > 0:
        fam_position_ids = torch.arange(P0 - F, P0, device=device)[None] + offset  # (1 or B, F)
        fam_reference = fam_init if fresh else next(s.fam for s in states if s.fam is not None)

    # 6. complete blocks before this chunk (capped at M+1: "the first block has left the window")
    blocks_before = part_len.new_zeros(batch) if fresh or states[0].mem_blocks is None else states[0].mem_blocks

    # 7. which timeline slots hold a real token, and the shape of every working block
    in_block = not fresh and max_complete == 0  # decoding inside the current block
    compact = num_blocks == 1
    timeline_ok = None
    if not in_block:
        pos = torch.arange((M + num_blocks) * C, device=device)
        work_ok = (pos[None, :] >= M * C) & (pos[None, :] < M * C + work_len[:, None])
        mem_ok = (pos[None, :] < M * C) & (pos[None, :] >= (M - blocks_before[:, None]) * C)
        timeline_ok = work_ok | mem_ok  # (B, (M+T)*C)
    if compact:
        shapes = [None] * num_blocks
    else:
        shapes = classify_blocks(settings, timeline_ok.view(batch, M + num_blocks, C), blocks_before)

    return FAMPlan(
        settings=settings,
        fam_lengths=fam_lengths,
        layouts=layouts,
        batch=batch,
        n=n,
        fresh=fresh,
        keep_state=keep_state,
        use_graphs=graphs_usable(device, cuda_graphs),
        graphs_requested=cuda_graphs,
        slot=slot,
        work_len=work_len,
        complete_blocks=work_len // C,
        num_blocks=num_blocks,
        min_complete=min(complete),
        max_complete=max_complete,
        aligned=prefix_shaped and at_boundary,
        compact=compact,
        in_block=in_block,
        position_ids=position_ids,
        fam_position_ids=fam_position_ids,
        fam_reference=fam_reference,
        blocks_before=blocks_before,
        timeline_ok=timeline_ok,
        block_shapes=tuple(shapes),
    )


def classify_blocks(
    settings: FAMSettings, timeline_ok3: torch.Tensor, blocks_before: torch.Tensor
) -> list[BlockShape | None]:
    """The shape of every working block, from the timeline's validity (B, M+T, C) (one host sync).

    A block is *regular*, with shape `(m, fam_on)`, when in every row its own block is complete, its last m
    memory blocks are complete and the M - m before them are empty (the first blocks of a sequence), and the
    FAM is read by every row (`fam_on`) or by none (fam_update "sink" before the first block leaves the
    window). A regular block attends to exactly those m·C + (F if fam_on) + C keys under one mask, the same
    for all of them and built once per forward: no work on keys that no query can see. Any other block is
    *irregular* (None): its keys are masked row by row.
    """
    M = settings.memory_segments
    T = timeline_ok3.shape[1] - M
    full = timeline_ok3.all(dim=2).all(dim=0)  # (M+T,) the block is complete in every row
    empty = ~timeline_ok3.any(dim=2).any(dim=0)  # (M+T,) no row has a token there
    if settings.fam_update == "sink":
        readable = _sink_readable(blocks_before, M, 0, T)  # (B, T)
        reads = torch.stack([readable.all(dim=0), ~readable.any(dim=0)])  # (2, T): all rows / no row
    else:
        reads = torch.stack([torch.ones(T, dtype=torch.bool), torch.zeros(T, dtype=torch.bool)])
    full, empty, (all_read, none_read) = full.tolist(), empty.tolist(), reads.tolist()
    shapes = []
    for t in range(T):
        memory = range(t, t + M)  # timeline indices of the memory blocks, M blocks back first
        m = 0
        while m < M and full[memory[M - 1 - m]]:
            m += 1
        uniform = full[M + t] and all(empty[i] for i in memory[: M - m]) and (all_read[t] or none_read[t])
        shapes.append((m, all_read[t]) if uniform else None)
    return shapes


def _sink_readable(blocks_before: torch.Tensor, memory_segments: int, t0: int, t1: int) -> torch.Tensor:
    """(B, t1 - t0) bool: whether working blocks t0..t1-1 read the sink (see `FAMPlan.sink_readable`)."""
    t = torch.arange(t0, t1, device=blocks_before.device)
    return (blocks_before[:, None] + t[None, :]) > memory_segments
