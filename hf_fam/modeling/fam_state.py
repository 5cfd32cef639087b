"""What one layer carries from one chunk of a stream to the next (`FAMLayerState`).

The keys/values are kept in one *window* buffer laid out exactly as the current block's queries read it:

    [ memory: M·C keys, in the current block's frame | FAM: F | current block: C, own frame | dump: 1 ]

so a decoding step attends to the buffer as it is and writes its new token in place; only when a block
completes is the buffer rebuilt (the memory shifts by one block and is rotated by -C). The last slot
receives padding tokens' writes and is never attended.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .fam_adapters import apply_rotation


@dataclass
class FAMLayerState:
    """Constant-size state of one layer: (M+1)·C + F keys/values and F FAM vectors per row."""

    win_k: torch.Tensor | None = None  # (B, KVH, M*C + F + C + 1, hd)
    win_v: torch.Tensor | None = None
    mem_blocks: torch.Tensor | None = None  # (B,) memory blocks holding real tokens (0..M); M+1 once the first
    # block has left the window too (read by fam_update "sink")
    part_len: torch.Tensor | None = None  # (B,) tokens in the current block
    fam: torch.Tensor | None = None  # (B, F, D) FAM state, in this layer's input space
    # the window's FAM slot is not filled yet: the keys/values of `fam` are computed when a chunk first reads them
    # there (one inside the current block); a chunk that completes a block computes them in its first update
    fam_pending: bool = False

    def tensors(self) -> dict[str, torch.Tensor]:
        return {k: v for k, v in vars(self).items() if isinstance(v, torch.Tensor)}


class WindowLayout:
    """Offsets of the window buffer for settings C, M, F."""

    def __init__(self, block_size: int, memory_segments: int, fam_length: int):
        self.C, self.M, self.F = block_size, memory_segments, fam_length
        self.mem = slice(0, self.M * self.C)
        self.fam = slice(self.M * self.C, self.M * self.C + self.F)
        self.part = slice(self.M * self.C + self.F, self.M * self.C + self.F + self.C)
        self.attended = self.M * self.C + self.F + self.C  # S: keys a block token may read
        self.length = self.attended + 1  # plus the dump slot


def rotate_memory(mem: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, block_size: int,
                  to_view: bool, interleaved: bool = False) -> torch.Tensor:
    """Move M memory blocks (B, KVH, M*C, hd), oldest first, between their own frames and the current
    block's frame (slot j is M - j blocks back: rotation by -(M-j)·C, or back with `to_view=False`);
    `interleaved`: the family's rotary channel pairing (`relative_rotation`)."""
    batch, heads, length, dim = mem.shape
    M = length // block_size
    if M == 0:
        return mem
    blocks = mem.view(batch, heads, M, block_size, dim)
    # cos/sin rows are for s = 1..M blocks back; slot j (oldest first) is s = M - j back
    c = cos.flip(0)[:, None, :]  # (M, 1, rot)
    s = sin.flip(0)[:, None, :] * (1 if to_view else -1)
    return apply_rotation(blocks, c, s, interleaved).view(batch, heads, length, dim)


def build_window(layout: WindowLayout, mem_view: torch.Tensor, fam_kv: torch.Tensor | None,
                 part: torch.Tensor) -> torch.Tensor:
    """Assemble [memory | FAM | block | dump] along dim 2."""
    batch, heads, _, dim = part.shape
    pieces = [mem_view]
    if fam_kv is not None:
        pieces.append(fam_kv)
    pieces += [part, part.new_zeros(batch, heads, 1, dim)]
    return torch.cat(pieces, dim=2)


def write_index(layout: WindowLayout, slot: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """The scatter index (B, KVH, n, hd) writing a chunk's tokens of `shape` at `slot` (B, n) of the current block;
    padding (slot -1) goes to the dump slot."""
    index = torch.where(slot >= 0, layout.part.start + slot, layout.length - 1)
    return index[:, None, :, None].expand(shape[0], shape[1], shape[2], shape[3])


def write_tokens(window: torch.Tensor, index: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Write the chunk's tokens x (B, KVH, n, hd) into the window at `index` (`write_index`). In place when no
    gradient is recorded (decoding), out of place otherwise."""
    recording = torch.is_grad_enabled() and (x.requires_grad or window.requires_grad)
    # tensors made under inference_mode may only be written in place under inference_mode
    frozen = window.is_inference() and not torch.is_inference_mode_enabled()
    if recording or frozen:
        return window.scatter(2, index, x)
    return window.scatter_(2, index, x)
