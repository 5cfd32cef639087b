"""The FAM computation (docs/design.md §1), written once for every decoder family.

FAM runs *inside* the checkpoint's own decoder: the model's forward, decoder layers, norms, projections,
rotary embedding and MLP all run unchanged. What changes is the attention function. The layer's
attention module computes Q/K/V as usual and calls `fam_attention_forward` (registered with transformers'
`AttentionInterface` as `fam_sdpa` / `fam_eager`), which

1. lays the chunk's keys out on a *timeline* of blocks of C tokens, preceded by the M cached memory blocks
   (blocks are counted from each row's first real token; padding never enters the timeline);
2. runs the layer's FAM chain: for every completed block, the same decoder layer is called again on the F
   FAM tokens (`FAMStep`), whose queries attend to the previous FAM and the block, and whose output
   (after the layer's own MLP) is the new FAM, fed back to this layer for the next block (`fam_chain`);
3. runs the attention of all blocks at once: block τ's queries see the M previous blocks, the FAM that
   preceded block τ, and block τ causally.

Positions. Attention only depends on relative positions, so every block is computed in its *own frame*:
its tokens sit at positions P0 .. P0+C-1, the FAM it reads at P0-F .. P0-1 (the last F positions of the
previous block, docs/design.md §1), and a memory block s blocks back at P0-sC .. P0-sC+C-1. Keys are computed
once in their own block's frame; moving them to a later block's frame is a rotation by -sC, computed in
float64. Positions therefore never exceed (M+1)·C, however long the stream: a block after a million
tokens is computed exactly like one at the start.

The same code serves the parallel schedule (a whole sequence, training and prefill) and streaming (a chunk
continuing a `FAMLayerState` held by the cache): a fresh run is a stream with an empty state.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .fam_adapters import DecoderAdapter, apply_rotation, relative_rotation
from .fam_chain import FAMChain, FAMStep
from .fam_compat import (
    FAM_ATTENTION_PREFIX,
    additive_mask,
    call_inner_attention,
    in_fam_forward,
    inner_attention_function,
)
from .fam_graphs import graphs_usable
from .fam_settings import FAMSettings
from .fam_split_attention import split_attention, split_attention_usable
from .fam_state import FAMLayerState, WindowLayout, build_window, rotate_memory, write_tokens

# Set on the modules of a base model that a FAM model shares (`FAMForCausalLM.from_base_model`): called
# outside a FAM forward, they run the base model's own attention instead of failing.
SHARED_BASE_FLAG = "_fam_shared_base"

# Upper bound on the attention scores materialised by one inner attention call; the blocks of a long
# sequence are processed in groups so that prefill memory does not grow with the square of anything.
_SCORE_BYTES_BUDGET = 256 * 2**20


def fam_attention_forward(module: nn.Module, query, key, value, attention_mask, **kwargs):
    """The attention function registered as `fam_sdpa` / `fam_eager`.

    Args:
        module: the layer's attention module (has `layer_idx`).
        query: (B, H, n, hd), key/value: (B, KVH, n, hd), RoPE applied at frame positions.
        attention_mask: ignored; padding comes from the `FAMRun` (transformers builds no mask for FAM).
        kwargs: `fam_run` (the forward's FAMRun) or `fam_step` (a nested FAM call), plus the attention
            module's own arguments (scaling, dropout, softcap, ...), passed on to the inner function.
    Returns:
        (attn_output (B, n, H, hd), None)
    """
    step = kwargs.get("fam_step")
    if step is not None:
        return step.attend(module, query, key, value, kwargs)
    run = kwargs.get("fam_run")
    if run is None:
        if getattr(module, SHARED_BASE_FLAG, False) and not in_fam_forward():
            # the base model a FAM model was made from (`from_base_model` shares its modules) runs its own
            # attention, with the mask transformers built for it
            inner = module.config._attn_implementation.removeprefix(FAM_ATTENTION_PREFIX)
            return inner_attention_function(module, inner)(module, query, key, value, attention_mask, **kwargs)
        raise RuntimeError(
            "FAM attention was called without FAM state: call the FAM model's forward (or generate), "
            "not its decoder layers directly."
        )
    return run.block_attention(module, query, key, value, kwargs), None


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


class FAMRun(FAMChain):
    """State of one forward call, shared by all layers (passed through the model as `fam_run`).

    Built by `FAMRun.start` before the decoder runs; each layer's attention reads its `FAMLayerState`
    from `states` and, when `keep_state` is set, leaves the updated state there for the cache.
    """

    def __init__(self, *, settings: FAMSettings, adapter: DecoderAdapter, decoder: nn.Module, inner: str):
        self.settings = settings
        self.adapter = adapter
        self.decoder = decoder
        self.layers = adapter.layers(decoder)
        self.inner = inner
        self.states: list[FAMLayerState] = []
        self.keep_state = False
        self._rotations: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self._block_shapes: list[tuple[int, bool] | None] | None = None
        self._regular_masks: dict[tuple, torch.Tensor] = {}

    # ------------------------------------------------------------------------------------------------
    # set-up, once per forward
    # ------------------------------------------------------------------------------------------------
    @classmethod
    def start(
        cls,
        *,
        settings: FAMSettings,
        adapter: DecoderAdapter,
        decoder: nn.Module,
        inner: str,
        chunk_mask: torch.Tensor,
        fam_init: torch.Tensor | None,
        states: list[FAMLayerState] | None = None,
        keep_state: bool = False,
        fam_state: list[torch.Tensor] | None = None,
        position_offset: torch.Tensor | None = None,
        cuda_graphs: bool = True,
    ) -> FAMRun:
        """Lay out one chunk.

        Args:
            chunk_mask: (B, n) bool, True for real tokens of this chunk.
            fam_init: (B, F, D) initial FAM at the embedding level (F_0^0), used when `states` is None.
            states: per-layer states continuing a stream, or None for a fresh sequence.
            keep_state: whether the layers must leave their updated state in `run.states`.
            fam_state: per-layer initial FAM (each (B or 1, F, D)) replacing the forward propagation of
                `fam_init` (Random State Passing); only for a fresh sequence.
            position_offset: (B,) integer offsets added to every position (Random Position Offset). With
                rotary embeddings attention depends on relative positions only, so this changes nothing
                but float rounding; it exists to reproduce the paper's training recipe.
            cuda_graphs: replay the FAM chain's update steps from CUDA graphs where possible (inference on
                CUDA, chunks of at least `MIN_GRAPH_STEPS` blocks; see `fam_graphs`). Same result.
        """
        run = cls(settings=settings, adapter=adapter, decoder=decoder, inner=inner)
        C, F = settings.block_size, settings.fam_length
        run.fam_lengths = [
            F if settings.fam_layers == "all" or adapter.is_global_layer(decoder, i) else 0 for i in range(len(run.layers))
        ]
        if F > 0 and not any(run.fam_lengths):
            raise ValueError("fam_layers='global', but this model has no global (full-attention) layer to hold FAM.")
        run.layouts = [WindowLayout(C, settings.memory_segments, f) for f in run.fam_lengths]
        batch, n = chunk_mask.shape
        device = chunk_mask.device
        run.keep_state = keep_state
        run.batch, run.n = batch, n
        run.use_graphs = graphs_usable(device, cuda_graphs)

        fresh = states is None
        part_len = torch.zeros(batch, dtype=torch.long, device=device) if fresh else states[0].part_len
        # index of every real token on the working timeline (the current block starts at 0)
        rank = chunk_mask.long().cumsum(1) - 1
        run.slot = torch.where(chunk_mask, part_len[:, None] + rank, -1)  # (B, n)
        run.work_len = part_len + chunk_mask.long().sum(1)  # (B,)

        # one host sync for all the shapes of this chunk
        work_len_cpu = run.work_len.tolist()
        prefix_shaped = bool((chunk_mask[:, :-1] >= chunk_mask[:, 1:]).all()) if n > 1 else True
        at_boundary = fresh or not bool(part_len.any())
        run.aligned = prefix_shaped and at_boundary  # slot == column index for every real token
        run.num_blocks = max(1, math.ceil(max(work_len_cpu) / C))
        complete = [w // C for w in work_len_cpu]
        run.min_complete, run.max_complete = min(complete), max(complete)
        run.complete_blocks = run.work_len // C  # (B,)
        run.compact = run.num_blocks == 1  # queries stay in token order (decode, short chunks)
        # decoding inside the current block: attend to the cached window as it is, write the new tokens
        run.in_block = not fresh and run.max_complete == 0

        P0 = settings.frame_origin
        offset = 0 if position_offset is None else position_offset.to(device=device, dtype=torch.long)[:, None]
        run.position_ids = torch.where(chunk_mask, P0 + run.slot.clamp(min=0) % C, P0) + offset  # (B, n)

        if fresh and fam_state is not None:
            if len(fam_state) != len(run.layers):
                raise ValueError(f"fam_state has {len(fam_state)} entries, the model has {len(run.layers)} layers.")
            fam_init = next((f for f in fam_state if f is not None), None)
        if F > 0:
            fam_pos = torch.arange(P0 - F, P0, device=device)[None] + offset  # (1 or B, F)
            run.fam_position_ids = fam_pos
            run.fam_reference = fam_init if fresh else next(s.fam for s in states if s.fam is not None)
            run._fam_position_embeddings = {}

        # complete blocks before this chunk (capped at M+1: "the first block has left the window")
        run.blocks_before = part_len.new_zeros(batch) if fresh or states[0].mem_blocks is None else states[0].mem_blocks
        run.final_fam = [None] * len(run.layers)
        if fresh:
            run.states = [FAMLayerState() for _ in run.layers]
            if F > 0 and fam_state is not None:
                for state, given in zip(run.states, fam_state):
                    if given is not None:
                        state.fam = given.expand(batch, -1, -1) if given.shape[0] == 1 else given
            elif F > 0:
                # F_0^0 = fam_init; F_0^{l+1} = Layer_l(F_0^l), FAM attending only to itself
                hidden = fam_init
                for idx, state in enumerate(run.states):
                    state.fam = hidden
                    hidden = run.call_layer(idx, hidden, FAMStep("init", inner))
        else:
            run.states = states
        return run

    # ------------------------------------------------------------------------------------------------
    # helpers
    # ------------------------------------------------------------------------------------------------
    def rotations(self, layer_idx: int, device) -> tuple[torch.Tensor, torch.Tensor]:
        """cos/sin (M, rot) moving a key s = 1..M blocks back, i.e. by -s·C positions."""
        inv_freq = self.adapter.inv_freq(self.decoder, layer_idx)
        key = id(inv_freq)
        if key not in self._rotations:
            C, M = self.settings.block_size, self.settings.memory_segments
            self._rotations[key] = relative_rotation(inv_freq, [-s * C for s in range(1, M + 1)], device)
        return self._rotations[key]

    # ------------------------------------------------------------------------------------------------
    # the layer's attention
    # ------------------------------------------------------------------------------------------------
    def block_attention(self, module: nn.Module, query, key, value, kwargs) -> torch.Tensor:
        """Block attention of one layer for the whole chunk, FAM chain included. Returns (B, n, H, hd)."""
        layer_idx = module.layer_idx
        state = self.states[layer_idx]
        if self.in_block:
            return self._attend_in_block(module, layer_idx, state, query, key, value, kwargs)
        C, M, F = self.settings.block_size, self.settings.memory_segments, self.fam_lengths[layer_idx]
        T = self.num_blocks
        batch, heads, n, head_dim = query.shape
        kv_heads = key.shape[1]

        # lay keys/values out on the timeline: M memory blocks, then T working blocks
        tl_k, tl_v, tl_ok = self._timeline(layer_idx, state, key, value)  # (B, KVH, (M+T)*C, hd), (B, (M+T)*C)

        # the FAM chain: keys/values of the FAM each block reads, and the new FAM
        fam_k = fam_v = None
        if F > 0:
            fam_k, fam_v, new_fam, next_k, next_v = self._fam_chain(layer_idx, state, tl_k, tl_v, tl_ok)
            self.final_fam[layer_idx] = new_fam

        # queries in block layout (B, T, H, Lq, hd)
        if self.compact:
            q_blocks = query[:, None]  # (B, 1, H, n, hd)
            q_in_block = self.slot.clamp(min=0)[:, None, :]  # (B, 1, n)
        else:
            if self.aligned:
                wq = _fit_length(query, T * C)
            else:
                index = torch.where(self.slot >= 0, self.slot, T * C)
                wq = _scatter_to_timeline(query, index, query.new_zeros(batch, heads, T * C, head_dim))
            q_blocks = wq.view(batch, heads, T, C, head_dim).transpose(1, 2)  # (B, T, H, C, hd)
            q_in_block = torch.arange(C, device=query.device)[None, None, :]  # (1, 1, C)
        Lq = q_blocks.shape[3]

        cos, sin = self.rotations(layer_idx, query.device) if M > 0 else (None, None)
        tl_k5 = tl_k.view(batch, kv_heads, M + T, C, head_dim)
        tl_v5 = tl_v.view(batch, kv_heads, M + T, C, head_dim)
        tl_ok3 = tl_ok.view(batch, M + T, C)
        per_block = batch * heads * Lq * (M * C + F + C) * 4
        group = max(1, _SCORE_BYTES_BUDGET // max(per_block, 1))

        outputs = []
        for t0, t1, shape in self._block_groups(tl_ok3, group):
            G = t1 - t0
            # 1. the keys each block reads: [memory s = m..1 (rotated -sC), FAM, own block]. A regular group
            #    (shape = (m, fam_on)) takes only its m filled memory blocks and, when no row reads the FAM,
            #    no FAM keys; an irregular group takes all M memory blocks and masks per row.
            m, f = (M, F) if shape is None else (shape[0], F if shape[1] else 0)
            S = m * C + f + C
            keys = query.new_empty(batch, G, kv_heads, S, head_dim)
            vals = query.new_empty(batch, G, kv_heads, S, value.shape[-1])
            mem_ok = []
            for s in range(m, 0, -1):
                lo = (m - s) * C
                src = slice(M - s + t0, M - s + t1)
                keys[:, :, :, lo : lo + C] = apply_rotation(tl_k5[:, :, src], cos[s - 1], sin[s - 1]).transpose(1, 2)
                vals[:, :, :, lo : lo + C] = tl_v5[:, :, src].transpose(1, 2)
                mem_ok.append(tl_ok3[:, src])  # (B, G, C)
            if f > 0:
                keys[:, :, :, m * C : m * C + f] = fam_k[:, t0:t1]
                vals[:, :, :, m * C : m * C + f] = fam_v[:, t0:t1]
            keys[:, :, :, m * C + f :] = tl_k5[:, :, M + t0 : M + t1].transpose(1, 2)
            vals[:, :, :, m * C + f :] = tl_v5[:, :, M + t0 : M + t1].transpose(1, 2)

            # 2. the mask
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
                    parts.append(self.fam_visible_blocks(F, t0, t1, own.device)[:, :, None, :].expand(batch, G, Lq, F))
                parts.append(own.expand(batch, G, Lq, C))
                mask = torch.cat(parts, dim=-1) if len(parts) > 1 else parts[0]
                mask = mask.reshape(batch * G, 1, Lq, S)

            # 3. attention of the group's queries over its keys: a regular group without autograd on the CPU
            #    as [keys all see] + [own block, causal] (fam_split_attention), else one masked call
            q = q_blocks[:, t0:t1].reshape(batch * G, heads, Lq, head_dim)
            keys4 = keys.view(batch * G, kv_heads, S, head_dim)
            vals4 = vals.view(batch * G, kv_heads, S, vals.shape[-1])
            if shape is not None and split_attention_usable(self.inner, q, kwargs):
                seen = m * C + (int(self.fam_visible(f, q.device).sum()) if f > 0 else 0)
                out = split_attention(module, q, keys4, vals4, seen, kwargs)
            else:
                out, _ = call_inner_attention(module, self.inner, q, keys4, vals4, mask, kwargs)
            outputs.append(out.reshape(batch, G * Lq, heads, out.shape[-1]))
        out = torch.cat(outputs, dim=1) if len(outputs) > 1 else outputs[0]  # (B, T*Lq, H, hd)

        if not self.compact:
            if self.aligned:
                out = _fit_length(out.transpose(1, 2), n).transpose(1, 2)  # trailing padding -> zeros
            else:
                index = self.slot.clamp(min=0)[:, :, None, None].expand(batch, n, heads, out.shape[-1])
                out = out.gather(1, index) * (self.slot >= 0)[:, :, None, None]
        if self.keep_state:
            self._save_state(layer_idx, tl_k5, tl_v5, new_fam if F > 0 else None, next_k if F > 0 else None,
                             next_v if F > 0 else None)
        return out

    def _block_groups(self, tl_ok3: torch.Tensor, group: int):
        """(t0, t1, shape) for the blocks of this chunk, at most `group` blocks at a time.

        `shape` is None for an *irregular* block (its keys are masked row by row), or `(m, fam_on)` for a
        *regular* one: in every row its own block is complete, its last m memory blocks are complete and the
        M - m before them are empty (the first blocks of a sequence), and the FAM is read by every row
        (`fam_on`) or by none (fam_update "sink" before the first block leaves the window). A regular
        block attends to exactly those m·C + (F if fam_on) + C keys under one mask, the same for all of them
        and built once per forward: no work on keys that no query can see. Runs of blocks of one shape are
        grouped. The timeline's validity is the same in every layer, so the shapes are computed once per
        forward (one host sync).
        """
        T = self.num_blocks
        if self.compact:
            shapes = [None] * T
        else:
            if self._block_shapes is None:
                self._block_shapes = self._shapes(tl_ok3)
            shapes = self._block_shapes
        t0 = 0
        while t0 < T:
            t1 = t0 + 1
            while t1 < T and t1 - t0 < group and shapes[t1] == shapes[t0]:
                t1 += 1
            yield t0, t1, shapes[t0]
            t0 = t1

    def _shapes(self, tl_ok3: torch.Tensor) -> list[tuple[int, bool] | None]:
        """The shape of every block of this chunk (see `_block_groups`)."""
        M, T = self.settings.memory_segments, self.num_blocks
        full = tl_ok3.all(dim=2).all(dim=0)  # (M+T,) the block is complete in every row
        empty = ~tl_ok3.any(dim=2).any(dim=0)  # (M+T,) no row has a token there
        if self.settings.fam_update == "sink":
            readable = self.sink_readable(0, T)
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

    def _regular_mask(self, memory_blocks: int, fam_length: int, dtype, device) -> torch.Tensor:
        """Additive mask (1, 1, C, m·C + F + C) of a regular block: memory and FAM visible, own block causal."""
        key = (memory_blocks, fam_length, dtype, device)
        if key not in self._regular_masks:
            C = self.settings.block_size
            causal = torch.ones(C, C, dtype=torch.bool, device=device).tril()
            fam = self.fam_visible(fam_length, device).expand(C, fam_length)
            allowed = torch.cat([causal.new_ones(C, memory_blocks * C), fam, causal], dim=1)
            self._regular_masks[key] = additive_mask(allowed, dtype)[None, None]
        return self._regular_masks[key]

    def _attend_in_block(self, module, layer_idx, state: FAMLayerState, query, key, value, kwargs) -> torch.Tensor:
        """No block completes in this chunk (decoding): the cached window already holds every key the
        chunk's queries read, in their frames; write the new tokens into it and attend. Returns (B, n, H, hd)."""
        lay = self.layouts[layer_idx]
        win_k = write_tokens(state.win_k, lay, key, self.slot)
        win_v = write_tokens(state.win_v, lay, value, self.slot)
        S = lay.attended
        device = query.device
        pos = torch.arange(S, device=device)
        mem_ok = (pos < lay.mem.stop) & (pos >= (self.settings.memory_segments - state.mem_blocks[:, None]) * lay.C)
        visible = int(self.fam_visible(lay.fam.stop - lay.fam.start, device).sum())
        fam_ok = (pos >= lay.fam.start) & (pos < lay.fam.start + visible)
        if self.settings.fam_update == "sink":
            fam_ok = fam_ok & self.sink_readable(0, 1)  # (B, S)
        j = pos - lay.part.start  # index inside the current block
        q_in_block = self.slot.clamp(min=0)[:, :, None]  # (B, n, 1)
        own = (j >= 0) & (((j <= q_in_block) & (j < self.work_len[:, None, None])) | (j == q_in_block))
        mask = (mem_ok | fam_ok)[:, None, :] | own  # (B, n, S)
        out, _ = call_inner_attention(module, self.inner, query, win_k[:, :, :S], win_v[:, :, :S], mask[:, None], kwargs)
        if self.keep_state:
            self.states[layer_idx] = FAMLayerState(
                win_k=win_k, win_v=win_v, mem_blocks=state.mem_blocks, part_len=self.work_len, fam=state.fam
            )
        self.final_fam[layer_idx] = state.fam
        return out

    def _timeline(self, layer_idx: int, state: FAMLayerState, key, value):
        """Keys/values/validity laid out as [M memory blocks | T working blocks], each in its own frame."""
        C, M = self.settings.block_size, self.settings.memory_segments
        lay = self.layouts[layer_idx]
        T = self.num_blocks
        batch, kv_heads, n, head_dim = key.shape
        device = key.device
        length = (M + T) * C
        pos = torch.arange(length, device=device)
        work_ok = (pos[None, :] >= M * C) & (pos[None, :] < M * C + self.work_len[:, None])
        mem_blocks = state.mem_blocks if state.win_k is not None else torch.zeros(batch, dtype=torch.long, device=device)
        mem_ok = (pos[None, :] < M * C) & (pos[None, :] >= (M - mem_blocks[:, None]) * C)
        ok = work_ok | mem_ok  # (B, (M+T)*C)

        if self.aligned:  # the chunk starts a block in every row: memory, then the chunk as it is
            if state.win_k is None:
                front = (0, 0, M * C, 0)
                return (nn.functional.pad(_fit_length(key, T * C), front),
                        nn.functional.pad(_fit_length(value, T * C), front), ok)
            mem_k = state.win_k[:, :, lay.mem]
            if M > 0:
                cos, sin = self.rotations(layer_idx, device)
                mem_k = rotate_memory(mem_k, cos, sin, C, to_view=False)
            return (torch.cat([mem_k, _fit_length(key, T * C)], dim=2),
                    torch.cat([state.win_v[:, :, lay.mem], _fit_length(value, T * C)], dim=2), ok)

        if state.win_k is not None and M > 0:
            cos, sin = self.rotations(layer_idx, device)
            bases = [
                (rotate_memory(state.win_k[:, :, lay.mem], cos, sin, C, to_view=False), state.win_k[:, :, lay.part]),
                (state.win_v[:, :, lay.mem], state.win_v[:, :, lay.part]),
            ]
        elif state.win_k is not None:
            bases = [(state.win_k[:, :, lay.mem], state.win_k[:, :, lay.part]),
                     (state.win_v[:, :, lay.mem], state.win_v[:, :, lay.part])]
        else:
            bases = [(None, None), (None, None)]
        index = torch.where(self.slot >= 0, M * C + self.slot, length)
        out = []
        for x, (mem, part) in zip((key, value), bases):
            mem = mem if mem is not None else x.new_zeros(batch, kv_heads, M * C, x.shape[-1])
            part = part if part is not None else x.new_zeros(batch, kv_heads, C, x.shape[-1])
            rest = x.new_zeros(batch, kv_heads, (T - 1) * C, x.shape[-1])
            out.append(_scatter_to_timeline(x, index, torch.cat([mem, part, rest], dim=2)))
        return out[0], out[1], ok

    def _save_state(self, layer_idx, tl_k5, tl_v5, fam, fam_k, fam_v):
        """Keep the last M complete blocks, the partial block and the FAM of every row."""
        C, M = self.settings.block_size, self.settings.memory_segments
        batch = tl_k5.shape[0]
        n_blocks = tl_k5.shape[2]  # M + T
        done = self.complete_blocks  # (B,)
        old = self.states[layer_idx]
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
            mem_k = rotate_memory(mem_k, cos, sin, C, to_view=True)
        prev_blocks = old.mem_blocks if old.mem_blocks is not None else torch.zeros_like(done)
        self.states[layer_idx] = FAMLayerState(
            win_k=build_window(self.layouts[layer_idx], mem_k, fam_k, part_k),
            win_v=build_window(self.layouts[layer_idx], mem_v, fam_v, part_v),
            mem_blocks=(prev_blocks + done).clamp(max=M + 1),
            part_len=self.work_len - done * C,
            fam=fam,
        )
