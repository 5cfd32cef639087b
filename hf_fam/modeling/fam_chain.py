"""The FAM chain (docs/design.md §1): per layer, the FAM is updated once per block, one block after another.

Each update calls the layer's own decoder layer on the F FAM tokens (`FAMStep`): their queries attend to
the previous FAM and the block, and the layer's MLP makes the new FAM, fed back to the same layer for the
next block. The keys/values each FAM produces on the way are what the block attention reads. On CUDA
without autograd, the update steps are replayed from a CUDA graph (`fam_graphs`).
"""

from __future__ import annotations

import torch

from .fam_compat import call_inner_attention, plain_layer_call
from .fam_graphs import MIN_GRAPH_STEPS, capture_chain_step
from .fam_state import FAMLayerState


class FAMStep:
    """One call of a decoder layer on FAM tokens, nested in the layer's block attention.

    mode "init":   FAM attends only to itself (forward propagation of the initial FAM);
    mode "update": FAM attends to itself and one block (the FAM update of docs/design.md §1);
    mode "probe":  only the FAM's keys/values are wanted; the attention output is zero.
    In every mode the FAM's own keys/values are recorded: they are what block tokens read.
    """

    def __init__(self, mode: str, inner: str, block_k=None, block_v=None, block_ok=None):
        self.mode = mode
        self.inner = inner
        self.block_k, self.block_v, self.block_ok = block_k, block_v, block_ok
        self.fam_k: torch.Tensor | None = None
        self.fam_v: torch.Tensor | None = None

    def attend(self, module, query, key, value, kwargs):
        self.fam_k, self.fam_v = key, value
        if self.mode == "probe":
            batch, heads, length, _ = query.shape
            return query.new_zeros(batch, length, heads, value.shape[-1]), None  # (B, F, H, hd)
        mask = None
        if self.mode == "update":
            key = torch.cat([key, self.block_k], dim=2)  # (B, KVH, F + C, hd)
            value = torch.cat([value, self.block_v], dim=2)
            if self.block_ok is not None:
                fam_ok = self.block_ok.new_ones(self.block_ok.shape[0], query.shape[2])
                mask = torch.cat([fam_ok, self.block_ok], dim=1)[:, None, None, :]  # (B, 1, 1, F + C)
        return call_inner_attention(module, self.inner, query, key, value, mask, kwargs)


class FAMChain:
    """The chain's part of `FAMRun` (a mixin): runs on the attributes `FAMRun.start` lays out (settings,
    layers, adapter, decoder, inner, the FAM positions, block counts, layouts, keep_state, use_graphs)."""

    def call_layer(self, layer_idx: int, hidden: torch.Tensor, step: FAMStep) -> torch.Tensor:
        """Run decoder layer `layer_idx` on FAM tokens `hidden` (B, F, D) with the given step."""
        layer = self.layers[layer_idx]
        position_ids = self.fam_position_ids.expand(hidden.shape[0], -1)
        with plain_layer_call(layer):
            out = layer(
                hidden,
                attention_mask=None,
                position_ids=position_ids,
                position_embeddings=self._fam_embeddings(layer_idx),
                fam_step=step,
            )
        return out[0] if isinstance(out, tuple) else out

    def _fam_embeddings(self, layer_idx: int):
        """The rotary (cos, sin) of the FAM positions for this layer's kind, computed once per forward."""
        kind = self.adapter.layer_type(self.decoder, layer_idx)
        if kind not in self._fam_position_embeddings:
            self._fam_position_embeddings[kind] = self.adapter.position_embeddings(
                self.decoder, self.fam_reference, self.fam_position_ids, layer_idx
            )
        return self._fam_position_embeddings[kind]

    def _chain_graph(self, layer_idx: int, fam, block_k, block_v):
        """A CUDA graph of this layer's FAM update step (inputs: one step's), or None."""
        if not self.use_graphs or self.min_complete < MIN_GRAPH_STEPS:
            return None
        self._fam_embeddings(layer_idx)  # on the forward's stream, before the capture

        def update(fam_in, k_in, v_in):
            step = FAMStep("update", self.inner, k_in, v_in, None)
            return self.call_layer(layer_idx, fam_in, step), step.fam_k, step.fam_v

        key = (id(self.layers[layer_idx]), self.inner)
        return capture_chain_step(self.decoder, update, fam, block_k, block_v, key)

    def _fam_chain(self, layer_idx: int, state: FAMLayerState, tl_k, tl_v, tl_ok):
        """Sequential over blocks, F tokens each: returns the FAM keys/values every block reads
        (B, T, KVH, F, hd), the new FAM (B, F, D) and the keys/values of that new FAM per row."""
        if self.settings.fam_update == "sink":
            return self._sink_chain(layer_idx, state)
        C, M = self.settings.block_size, self.settings.memory_segments
        T = self.num_blocks
        fam = state.fam
        ks, vs = [], []
        first = slice(M * C, (M + 1) * C)
        graph = self._chain_graph(layer_idx, fam, tl_k[:, :, first], tl_v[:, :, first])
        for t in range(T + (1 if self.keep_state else 0)):
            if t < self.max_complete:
                blk = slice((M + t) * C, (M + t + 1) * C)
                all_complete = t < self.min_complete
                if graph is not None and all_complete:  # same computation, replayed
                    fam, k, v = graph.step(fam, tl_k[:, :, blk], tl_v[:, :, blk])
                    ks.append(k)
                    vs.append(v)
                    continue
                step = FAMStep(
                    "update", self.inner, tl_k[:, :, blk], tl_v[:, :, blk], None if all_complete else tl_ok[:, blk]
                )
                new = self.call_layer(layer_idx, fam, step)
                done = self.complete_blocks > t  # (B,)
                fam = new if all_complete else torch.where(done[:, None, None], new, fam)
            elif t == 0 and state.win_k is not None:
                step = FAMStep("cached", self.inner)
                lay = self.layouts[layer_idx]
                step.fam_k, step.fam_v = state.win_k[:, :, lay.fam], state.win_v[:, :, lay.fam]
            elif t < T or self.max_complete == T:
                # keys of a FAM no update in this chunk has read yet (a trailing partial block, or the
                # block after the chunk for the cache)
                step = FAMStep("probe", self.inner)
                self.call_layer(layer_idx, fam, step)
            else:
                break
            ks.append(step.fam_k)
            vs.append(step.fam_v)
        fam_k = torch.stack(ks[:T], dim=1)  # (B, T, KVH, F, hd)
        fam_v = torch.stack(vs[:T], dim=1)
        next_k = next_v = None
        if self.keep_state:
            # the FAM each row's next block reads: after `complete_blocks` updates
            all_k = torch.stack(ks, dim=1)
            all_v = torch.stack(vs, dim=1)
            pick = self.complete_blocks.clamp(max=all_k.shape[1] - 1)[:, None, None, None, None]
            next_k = all_k.gather(1, pick.expand(-1, 1, *all_k.shape[2:]))[:, 0]
            next_v = all_v.gather(1, pick.expand(-1, 1, *all_v.shape[2:]))[:, 0]
        return fam_k, fam_v, fam, next_k, next_v

    def _sink_chain(self, layer_idx: int, state: FAMLayerState):
        """fam_update "sink": no update; every block reads the keys/values of the initial FAM (the same in
        every block's frame), computed once per forward. Same return values as `_fam_chain`."""
        step = FAMStep("probe", self.inner)
        self.call_layer(layer_idx, state.fam, step)
        k, v = step.fam_k, step.fam_v  # (B, KVH, F, hd)
        T = self.num_blocks
        fam_k = k[:, None].expand(k.shape[0], T, *k.shape[1:])
        fam_v = v[:, None].expand(v.shape[0], T, *v.shape[1:])
        return fam_k, fam_v, state.fam, (k if self.keep_state else None), (v if self.keep_state else None)

    def fam_visible(self, fam_length: int, device) -> torch.Tensor:
        """(F,) bool: which FAM slots block tokens read (all of them; only the first with fam_update "sink")."""
        visible = torch.ones(fam_length, dtype=torch.bool, device=device)
        if self.settings.fam_update == "sink":
            visible[1:] = False
        return visible

    def sink_readable(self, t0: int, t1: int) -> torch.Tensor:
        """(B, t1 - t0) bool: with fam_update "sink", whether blocks t0..t1-1 of this chunk read the sink: only
        once the sequence's first block (with the real BOS) has left their window, as attention sinks are
        kept in StreamingLLM. So a prompt within the window is computed exactly as by the base model."""
        t = torch.arange(t0, t1, device=self.blocks_before.device)
        return (self.blocks_before[:, None] + t[None, :]) > self.settings.memory_segments

    def fam_visible_blocks(self, fam_length: int, t0: int, t1: int, device) -> torch.Tensor:
        """(B, t1 - t0, F) bool: the FAM slots blocks t0..t1-1 of this chunk read."""
        visible = self.fam_visible(fam_length, device)[None, None, :]
        if self.settings.fam_update != "sink":
            return visible.expand(self.batch, t1 - t0, fam_length)
        return visible & self.sink_readable(t0, t1)[:, :, None]
