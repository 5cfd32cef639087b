"""Block attention (docs/design.md §1): one layer's attention over the chunk, for all blocks at once.

Block τ's queries see the M previous blocks (each moved into block τ's frame by a rotation of -sC), the FAM
that preceded block τ (from the FAM chain, `fam_chain`), and block τ causally. `BlockAttention` reads the
forward's `FAMPlan` (`fam_plan`): where each token lies on the timeline, which blocks are regular, what to
keep for the cache. It takes a layer's incoming `FAMLayerState` and returns the layer's output, its new
state and its final FAM; `FAMRun` (`fam_core`) keeps the states.
"""

from __future__ import annotations

import torch
from torch import nn

from .fam_adapters import DecoderAdapter, apply_rotation, relative_rotation
from .fam_chain import FAMChain
from .fam_compat import additive_mask, call_inner_attention
from .fam_plan import FAMPlan
from .fam_split_attention import refuse_kernel, split_attention, split_attention_usable
from .fam_state import FAMLayerState, WindowLayout, build_window, rotate_memory, write_index, write_tokens

# Upper bound on the attention scores materialised by one inner attention call; the blocks of a long
# sequence are processed in groups so that prefill memory does not grow with the square of anything.
_SCORE_BYTES_BUDGET = 256 * 2**20
# On CUDA, regular blocks go through fused kernels that materialise no scores (`fam_split_attention`): their
# groups are bounded by the keys and values gathered for them instead, so that a long chunk at batch 1 is a
# few kernel launches per layer, not one group per block.
_KEY_BYTES_BUDGET = 1024 * 2**20


def _scatter_to_timeline(x: torch.Tensor, index: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
    """Place the chunk's tokens x (B, h, n, d) at `index` (B, n) of `base` (B, h, L, d).

    Padding tokens carry index L (one past the end) and land in a dump slot that is cut off.
    """
    batch, heads, length, dim = base.shape
    dump = base.new_zeros(batch, heads, 1, dim)
    idx = index[:, None, :, None].expand(batch, heads, index.shape[1], dim)
    return torch.cat([base, dump], dim=2).scatter(2, idx, x)[:, :, :length]


def _fit_length(x: torch.Tensor, length: int) -> torch.Tensor:
    """Cut or zero-pad dim 2 of x (B, h, L, d) to `length` (trailing padding tokens hold no block)."""
    if x.shape[2] >= length:
        return x[:, :, :length]
    return nn.functional.pad(x, (0, 0, 0, length - x.shape[2]))


class BlockAttention:
    """The block attention of every layer of one forward. Holds only per-forward caches (rotations,
    regular masks); the layer states in and out are the caller's."""

    def __init__(self, plan: FAMPlan, adapter: DecoderAdapter, decoder: nn.Module, inner: str, chain: FAMChain):
        self.plan = plan
        self.adapter = adapter
        self.decoder = decoder
        self.inner = inner
        self.chain = chain
        self._rotations: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self._regular_masks: dict[tuple, torch.Tensor] = {}
        self._in_block: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}  # see `_in_block_layout`

    def rotations(self, layer_idx: int, device) -> tuple[torch.Tensor, torch.Tensor]:
        """cos/sin (M, rot) moving a key s = 1..M blocks back, i.e. by -s·C positions."""
        inv_freq = self.adapter.inv_freq(self.decoder, layer_idx)
        key = id(inv_freq)
        if key not in self._rotations:
            C, M = self.plan.settings.block_size, self.plan.settings.memory_segments
            self._rotations[key] = relative_rotation(inv_freq, [-s * C for s in range(1, M + 1)], device,
                                                     interleaved=self.adapter.interleaved_rotary)
        return self._rotations[key]

    def __call__(self, module: nn.Module, state: FAMLayerState, query, key, value, kwargs):
        """Block attention of layer `module.layer_idx` for the whole chunk, FAM chain included.

        Args:
            state: the layer's incoming state.
            query: (B, H, n, hd), key/value: (B, KVH, n, hd), RoPE applied at the plan's frame positions.
        Returns:
            out (B, n, H, hd); the layer's new state (None unless the plan keeps state); its final FAM
            (B, F, D) or None.
        """
        plan = self.plan
        layer_idx = module.layer_idx
        if plan.in_block:
            return self._attend_in_block(module, layer_idx, state, query, key, value, kwargs)
        C, M, F = plan.settings.block_size, plan.settings.memory_segments, plan.fam_lengths[layer_idx]
        T = plan.num_blocks
        batch, heads, n, head_dim = query.shape
        kv_heads = key.shape[1]

        # 1. keys/values on the timeline: M memory blocks, then T working blocks
        tl_k, tl_v = self._timeline(layer_idx, state, key, value)  # (B, KVH, (M+T)*C, hd)

        # 2. the FAM chain: keys/values of the FAM each block reads, and the new FAM
        fam_k = fam_v = new_fam = next_k = next_v = None
        if F > 0:
            fam_k, fam_v, new_fam, next_k, next_v = self.chain.run(layer_idx, state, tl_k, tl_v)  # (B, T, KVH, F, hd)

        # 3. queries in block layout (B, T, H, Lq, hd), and each query's index in its block
        if plan.compact:
            q_blocks = query[:, None]  # (B, 1, H, n, hd)
            q_in_block = plan.slot.clamp(min=0)[:, None, :]  # (B, 1, n)
        else:
            if plan.aligned:
                wq = _fit_length(query, T * C)
            else:
                index = torch.where(plan.slot >= 0, plan.slot, T * C)
                wq = _scatter_to_timeline(query, index, query.new_zeros(batch, heads, T * C, head_dim))
            q_blocks = wq.view(batch, heads, T, C, head_dim).transpose(1, 2)  # (B, T, H, C, hd)
            q_in_block = torch.arange(C, device=query.device)[None, None, :]  # (1, 1, C)
        Lq = q_blocks.shape[3]

        cos, sin = self.rotations(layer_idx, query.device) if M > 0 else (None, None)
        tl_k5 = tl_k.view(batch, kv_heads, M + T, C, head_dim)
        tl_v5 = tl_v.view(batch, kv_heads, M + T, C, head_dim)
        tl_ok3 = plan.timeline_ok.view(batch, M + T, C)
        per_block = batch * heads * Lq * (M * C + F + C) * 4
        group = max(1, _SCORE_BYTES_BUDGET // max(per_block, 1))
        fused = query.device.type == "cuda" and split_attention_usable(self.inner, query, kwargs)
        regular_group = group
        if fused:
            per_block_keys = 2 * batch * kv_heads * (M * C + F + C) * head_dim * query.element_size()
            regular_group = max(1, _KEY_BYTES_BUDGET // max(per_block_keys, 1))

        # 4. the blocks, a group of blocks of one shape at a time
        outputs = []
        for t0, t1, shape in self._block_groups(group, regular_group):
            G = t1 - t0
            # 4.1 the keys each block reads: [memory s = m..1 (rotated -sC), FAM, own block]. A regular group
            #     (shape = (m, fam_on)) takes only its m filled memory blocks and, when no row reads the FAM,
            #     no FAM keys; an irregular group takes all M memory blocks and masks per row.
            m, f = (M, F) if shape is None else (shape[0], F if shape[1] else 0)
            S = m * C + f + C
            keys = query.new_empty(batch, G, kv_heads, S, head_dim)
            vals = query.new_empty(batch, G, kv_heads, S, value.shape[-1])
            mem_ok = []
            for s in range(m, 0, -1):
                lo = (m - s) * C
                src = slice(M - s + t0, M - s + t1)
                moved = apply_rotation(tl_k5[:, :, src], cos[s - 1], sin[s - 1], self.adapter.interleaved_rotary)
                keys[:, :, :, lo : lo + C] = moved.transpose(1, 2)
                vals[:, :, :, lo : lo + C] = tl_v5[:, :, src].transpose(1, 2)
                mem_ok.append(tl_ok3[:, src])  # (B, G, C)
            if f > 0:
                keys[:, :, :, m * C : m * C + f] = fam_k[:, t0:t1]
                vals[:, :, :, m * C : m * C + f] = fam_v[:, t0:t1]
            keys[:, :, :, m * C + f :] = tl_k5[:, :, M + t0 : M + t1].transpose(1, 2)
            vals[:, :, :, m * C + f :] = tl_v5[:, :, M + t0 : M + t1].transpose(1, 2)

            # 4.2 the mask
            if shape is not None:  # every key slot holds a real token in every row: one mask for the group
                mask = self._regular_mask(m, f, query.dtype, query.device)  # (1, 1, C, S)
            else:
                # mask (B, G, Lq, S): memory and FAM by validity, own block causally; a query always sees
                # its own slot, so padding slots never have an empty row (NaN)
                own_ok = tl_ok3[:, M + t0 : M + t1]  # (B, G, C)
                k_idx = torch.arange(C, device=query.device)
                qib = q_in_block[:, :, :, None]  # (B|1, 1, Lq, 1)
                own = ((k_idx <= qib) & own_ok[:, :, None, :]) | (k_idx == qib)  # (B, G, Lq, C)
                parts = []
                if M > 0:
                    parts.append(torch.cat(mem_ok, dim=-1)[:, :, None, :].expand(-1, -1, Lq, -1))
                if F > 0:
                    parts.append(plan.fam_visible_blocks(F, t0, t1, own.device)[:, :, None, :].expand(batch, G, Lq, F))
                parts.append(own.expand(batch, G, Lq, C))
                mask = torch.cat(parts, dim=-1) if len(parts) > 1 else parts[0]
                mask = mask.reshape(batch * G, 1, Lq, S)

            # 4.3 attention of the group's queries over its keys: a regular group without autograd on the CPU as
            #     [keys all see] + [own block, causal] (fam_split_attention), else one masked call
            q = q_blocks[:, t0:t1].reshape(batch * G, heads, Lq, head_dim)
            keys4 = keys.view(batch * G, kv_heads, S, head_dim)
            vals4 = vals.view(batch * G, kv_heads, S, vals.shape[-1])
            out = None
            if shape is not None and split_attention_usable(self.inner, q, kwargs):
                seen = m * C + plan.fam_visible_count(f)
                try:
                    out = split_attention(module, q, keys4, vals4, seen, kwargs)
                except (RuntimeError, NotImplementedError) as err:  # a CUDA kernel refusing these inputs
                    refuse_kernel(q, err)  # remembered, with a warning (raised on the CPU)
            if out is None:
                out, _ = call_inner_attention(module, self.inner, q, keys4, vals4, mask, kwargs)
            outputs.append(out.reshape(batch, G * Lq, heads, out.shape[-1]))
        out = torch.cat(outputs, dim=1) if len(outputs) > 1 else outputs[0]  # (B, T*Lq, H, hd)

        # 5. the outputs back in the chunk's token order (B, n, H, hd); padding gets zeros
        if not plan.compact:
            if plan.aligned:
                out = _fit_length(out.transpose(1, 2), n).transpose(1, 2)  # trailing padding -> zeros
            else:
                index = plan.slot.clamp(min=0)[:, :, None, None].expand(batch, n, heads, out.shape[-1])
                out = out.gather(1, index) * (plan.slot >= 0)[:, :, None, None]

        # 6. the state the cache keeps
        new_state = None
        if plan.keep_state:
            new_state = self._save_state(layer_idx, state, tl_k5, tl_v5, new_fam, next_k, next_v)
        return out, new_state, new_fam

    def _block_groups(self, group: int, regular_group: int):
        """(t0, t1, shape) for the blocks of this chunk, at most `group` blocks at a time (`regular_group` for
        regular ones): runs of blocks of one shape (`FAMPlan.block_shapes`, see `fam_plan.classify_blocks`)
        are grouped."""
        T, shapes = self.plan.num_blocks, self.plan.block_shapes
        t0 = 0
        while t0 < T:
            t1 = t0 + 1
            size = group if shapes[t0] is None else regular_group
            while t1 < T and t1 - t0 < size and shapes[t1] == shapes[t0]:
                t1 += 1
            yield t0, t1, shapes[t0]
            t0 = t1

    def _regular_mask(self, memory_blocks: int, fam_length: int, dtype, device) -> torch.Tensor:
        """Additive mask (1, 1, C, m·C + F + C) of a regular block: memory and FAM visible, own block causal."""
        key = (memory_blocks, fam_length, dtype, device)
        if key not in self._regular_masks:
            C = self.plan.settings.block_size
            causal = torch.ones(C, C, dtype=torch.bool, device=device).tril()
            fam = self.plan.fam_visible(fam_length, device).expand(C, fam_length)
            allowed = torch.cat([causal.new_ones(C, memory_blocks * C), fam, causal], dim=1)
            self._regular_masks[key] = additive_mask(allowed, dtype)[None, None]
        return self._regular_masks[key]

    def _attend_in_block(self, module, layer_idx, state: FAMLayerState, query, key, value, kwargs):
        """No block completes in this chunk (decoding): the cached window already holds every key the
        chunk's queries read, in their frames; write the new tokens into it and attend. Same returns as
        `__call__`."""
        plan = self.plan
        lay = plan.layouts[layer_idx]
        index, mask = self._in_block_layout(lay, key.shape, query.device)
        win_k, win_v = state.win_k, state.win_v
        if state.fam_pending:  # the first chunk inside this block: the FAM's keys/values, left by the last chunk
            fam_k, fam_v = self.chain.probe(layer_idx, state.fam)
            win_k = torch.cat([win_k[:, :, : lay.fam.start], fam_k, win_k[:, :, lay.fam.stop :]], dim=2)
            win_v = torch.cat([win_v[:, :, : lay.fam.start], fam_v, win_v[:, :, lay.fam.stop :]], dim=2)
        win_k = write_tokens(win_k, index, key)
        win_v = write_tokens(win_v, index, value)
        S = lay.attended
        out, _ = call_inner_attention(module, self.inner, query, win_k[:, :, :S], win_v[:, :, :S], mask, kwargs)
        new_state = None
        if plan.keep_state:
            new_state = FAMLayerState(
                win_k=win_k, win_v=win_v, mem_blocks=state.mem_blocks, part_len=plan.work_len, fam=state.fam
            )
        return out, new_state, state.fam

    def _in_block_layout(self, lay: WindowLayout, shape: torch.Size, device) -> tuple[torch.Tensor, torch.Tensor]:
        """For a chunk inside the current block: where its keys/values (of `shape`) go in a window of layout
        `lay` (`write_index`), and the mask (B, 1, n, S) of what its queries read there: the memory blocks
        holding real tokens, the visible FAM slots and the current block causally. Both depend only on the
        plan and the layout (every layer's window holds the same blocks: `FAMPlan.blocks_before`), so they are
        built once per forward and layout, not per layer (decoding is launch-bound)."""
        key = (lay.F, tuple(shape), device)
        if key not in self._in_block:
            plan = self.plan
            S = lay.attended
            pos = torch.arange(S, device=device)
            first_mem = (plan.settings.memory_segments - plan.blocks_before.clamp(max=lay.M)[:, None]) * lay.C
            mem_ok = (pos < lay.mem.stop) & (pos >= first_mem)  # (B, S)
            fam_ok = (pos >= lay.fam.start) & (pos < lay.fam.start + plan.fam_visible_count(lay.F))  # (S,)
            if plan.settings.fam_update == "sink":
                fam_ok = fam_ok & plan.sink_readable(0, 1)  # (B, S)
            j = pos - lay.part.start  # index inside the current block
            q_in_block = plan.slot.clamp(min=0)[:, :, None]  # (B, n, 1)
            own = (j >= 0) & (((j <= q_in_block) & (j < plan.work_len[:, None, None])) | (j == q_in_block))
            mask = (mem_ok | fam_ok)[:, None, :] | own  # (B, n, S)
            self._in_block[key] = write_index(lay, plan.slot, shape), mask[:, None]
        return self._in_block[key]

    def _timeline(self, layer_idx: int, state: FAMLayerState, key, value):
        """Keys/values (B, KVH, (M+T)*C, hd) laid out as [M memory blocks | T working blocks], each in its own
        frame; slots without a real token (`FAMPlan.timeline_ok`) hold zeros."""
        plan = self.plan
        C, M = plan.settings.block_size, plan.settings.memory_segments
        lay = plan.layouts[layer_idx]
        T = plan.num_blocks
        batch, kv_heads, n, head_dim = key.shape
        device = key.device

        # 1. the chunk starts a block in every row: memory (none in a fresh sequence), then the chunk as it is
        if plan.aligned:
            if state.win_k is None:
                front = (0, 0, M * C, 0)
                return (nn.functional.pad(_fit_length(key, T * C), front),
                        nn.functional.pad(_fit_length(value, T * C), front))
            mem_k = state.win_k[:, :, lay.mem]
            if M > 0:
                cos, sin = self.rotations(layer_idx, device)
                mem_k = rotate_memory(mem_k, cos, sin, C, to_view=False,
                                      interleaved=self.adapter.interleaved_rotary)
            return (torch.cat([mem_k, _fit_length(key, T * C)], dim=2),
                    torch.cat([state.win_v[:, :, lay.mem], _fit_length(value, T * C)], dim=2))

        # 2. otherwise the cached memory (moved to its own frames) and partial block, as (memory, partial)
        if state.win_k is not None and M > 0:
            cos, sin = self.rotations(layer_idx, device)
            bases = [
                (rotate_memory(state.win_k[:, :, lay.mem], cos, sin, C, to_view=False,
                                      interleaved=self.adapter.interleaved_rotary), state.win_k[:, :, lay.part]),
                (state.win_v[:, :, lay.mem], state.win_v[:, :, lay.part]),
            ]
        elif state.win_k is not None:
            bases = [(state.win_k[:, :, lay.mem], state.win_k[:, :, lay.part]),
                     (state.win_v[:, :, lay.mem], state.win_v[:, :, lay.part])]
        else:
            bases = [(None, None), (None, None)]

        # 3. ... and the chunk's real tokens scattered to their slots after them
        length = (M + T) * C
        index = torch.where(plan.slot >= 0, M * C + plan.slot, length)
        out = []
        for x, (mem, part) in zip((key, value), bases):
            mem = mem if mem is not None else x.new_zeros(batch, kv_heads, M * C, x.shape[-1])
            part = part if part is not None else x.new_zeros(batch, kv_heads, C, x.shape[-1])
            rest = x.new_zeros(batch, kv_heads, (T - 1) * C, x.shape[-1])
            out.append(_scatter_to_timeline(x, index, torch.cat([mem, part, rest], dim=2)))
        return out[0], out[1]

    def _save_state(self, layer_idx, old: FAMLayerState, tl_k5, tl_v5, fam, fam_k, fam_v) -> FAMLayerState:
        """The layer's new state: the last M complete blocks, the partial block and the FAM of every row."""
        plan = self.plan
        C, M = plan.settings.block_size, plan.settings.memory_segments
        batch = tl_k5.shape[0]
        n_blocks = tl_k5.shape[2]  # M + T
        done = plan.complete_blocks  # (B,)
        # timeline blocks of the last M complete blocks: done .. done + M - 1; the partial block: M + done,
        # which is one past the timeline for rows whose chunk ended on a block boundary (then it is empty)
        idx = done[:, None] + torch.arange(M + 1, device=done.device)[None, :]  # (B, M+1)
        beyond = idx >= n_blocks

        def take(blocks5):
            kv_heads, dim = blocks5.shape[1], blocks5.shape[-1]
            i = idx.clamp(max=n_blocks - 1)[:, None, :, None, None].expand(batch, kv_heads, M + 1, C, dim)
            picked = blocks5.gather(2, i).masked_fill(beyond[:, None, :, None, None], 0.0)  # (B, KVH, M+1, C, d)
            return picked[:, :, :M].reshape(batch, kv_heads, M * C, dim), picked[:, :, M]

        mem_k, part_k = take(tl_k5)
        mem_v, part_v = take(tl_v5)
        if M > 0:
            cos, sin = self.rotations(layer_idx, mem_k.device)
            mem_k = rotate_memory(mem_k, cos, sin, C, to_view=True,
                                  interleaved=self.adapter.interleaved_rotary)
        prev_blocks = old.mem_blocks if old.mem_blocks is not None else torch.zeros_like(done)
        layout = plan.layouts[layer_idx]
        pending = fam_k is None and layout.F > 0  # left to a later chunk (`FAMChain.defers_probe`)
        if pending:
            fam_k = part_k.new_zeros(*part_k.shape[:2], layout.F, part_k.shape[-1])
            fam_v = part_v.new_zeros(*part_v.shape[:2], layout.F, part_v.shape[-1])
        return FAMLayerState(
            win_k=build_window(layout, mem_k, fam_k, part_k),
            win_v=build_window(layout, mem_v, fam_v, part_v),
            mem_blocks=(prev_blocks + done).clamp(max=M + 1),
            part_len=plan.work_len - done * C,
            fam=fam,
            fam_pending=pending,
        )
