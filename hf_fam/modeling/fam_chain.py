"""The FAM chain (docs/design.md §1): per layer, the FAM is updated once per block, one block after another.

Each update calls the layer's own decoder layer on the F FAM tokens (`FAMStep`): their queries attend to
the previous FAM and the block, and the layer's MLP makes the new FAM, fed back to the same layer for the
next block. The keys/values each FAM produces on the way are what the block attention reads. On CUDA
without autograd, the update and probe steps are replayed from CUDA graphs kept across forwards (`fam_graphs`).
Under autograd (training), a layer's steps run as one autograd Function recomputed step by step in backward
(`fam_chain_grad`).

`FAMChain` holds one forward's chain: it reads the forward's `FAMPlan` (`fam_plan`) and calls the layers;
the block attention (`fam_block_attention`) asks it for each layer's FAM keys/values, and `FAMRun.start`
for the initial FAM of a fresh sequence.
"""

from __future__ import annotations

import torch

from .fam_adapters import DecoderAdapter
from .fam_chain_grad import chain_with_recompute, recompute_in_backward
from .fam_compat import call_inner_attention, plain_layer_call
from .fam_compile import compiling_steps, layer_call
from .fam_graphs import cached_chain_step, group_steps, module_fingerprint
from .fam_plan import FAMPlan
from .fam_state import FAMLayerState


def _flat_positions(positions):
    """(position_ids, position_embeddings) as a flat list of tensors (a graph's inputs), and the function that
    rebuilds the pair from the graph's copies of them."""
    position_ids, embeddings = positions
    is_tuple = isinstance(embeddings, (tuple, list))

    def rebuild(static):
        return static[0], (tuple(static[1:]) if is_tuple else static[1])

    return [position_ids, *(embeddings if is_tuple else [embeddings])], rebuild


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
    """The FAM chain of one forward: every layer's FAM, updated block after block (docs/design.md §1).

    Reads the forward's plan (FAM positions, block counts, window layouts, keep_state, use_graphs) and
    calls the decoder's own layers on the F FAM tokens. Its only state is a per-forward cache of the FAM
    positions' rotary embeddings.
    """

    def __init__(self, plan: FAMPlan, adapter: DecoderAdapter, decoder: torch.nn.Module, inner: str):
        self.plan = plan
        self.adapter = adapter
        self.decoder = decoder
        self.layers = adapter.layers(decoder)
        self.inner = inner
        self._fam_position_embeddings: dict = {}  # layer kind -> (cos, sin) of the FAM positions
        self._fingerprints: dict = {}  # layer index -> module_fingerprint, when this forward may replay graphs
        # layer index -> the chain's results in this forward, for gradient checkpointing's recompute of the layer
        # (`fam_chain_grad`)
        self.recorded: dict = {}
        # set by `fam_chain_grad` while a training forward's steps run without autograd and it may replay graphs
        self.graphs_in_training = False
        # the layer calls inside this forward's inference graphs are compiled (`fam_compile`)
        self.compile_steps = compiling_steps() and plan.use_graphs

    def call_layer(self, layer_idx: int, hidden: torch.Tensor, step: FAMStep, positions=None,
                   compiled: bool = False) -> torch.Tensor:
        """Run decoder layer `layer_idx` on FAM tokens `hidden` (B, F, D) with the given step. `positions`:
        (position_ids, position_embeddings) to use instead of this forward's (a graph's own copies).
        `compiled`: through `fam_compile` (a graph's step, when this forward compiles them)."""
        layer = self.layers[layer_idx]
        position_ids, embeddings = positions if positions is not None else self._positions(layer_idx, hidden.shape[0])
        with plain_layer_call(layer):
            return layer_call(self.layers, layer, hidden, position_ids, embeddings, step,
                              compiled and self.compile_steps)

    def _positions(self, layer_idx: int, batch: int):
        """(position_ids (B, F), position_embeddings) of the FAM tokens for this layer."""
        return self.plan.fam_position_ids.expand(batch, -1), self._fam_embeddings(layer_idx)

    def _fam_embeddings(self, layer_idx: int):
        """The rotary (cos, sin) of the FAM positions for this layer's kind, computed once per forward."""
        kind = self.adapter.layer_type(self.decoder, layer_idx)
        if kind not in self._fam_position_embeddings:
            self._fam_position_embeddings[kind] = self.adapter.position_embeddings(
                self.decoder, self.plan.fam_reference, self.plan.fam_position_ids, layer_idx
            )
        return self._fam_position_embeddings[kind]

    def initial_states(self, fam_init: torch.Tensor | None, fam_state: list | None) -> list[FAMLayerState]:
        """The states of a fresh sequence: no keys yet, and each layer's initial FAM F_0^l, either given
        (`fam_state`, each (B or 1, F, D)) or propagated from `fam_init` (B, F, D):
        F_0^0 = fam_init, F_0^{l+1} = Layer_l(F_0^l) with the FAM attending only to itself."""
        states = [FAMLayerState() for _ in self.layers]
        if self.plan.settings.fam_length == 0:
            return states
        if fam_state is not None:
            batch = self.plan.batch
            for state, given in zip(states, fam_state):
                if given is not None:
                    state.fam = given.expand(batch, -1, -1) if given.shape[0] == 1 else given
            return states
        batch = fam_init.shape[0]
        shared = batch == 1 or (fam_init.stride(0) == 0 and self.plan.fam_position_ids.shape[0] == 1)
        # every row starts from the same FAM at the same positions (no per-row offset): propagate one row
        hidden = fam_init[:1] if shared else fam_init
        graph = self._init_graph(hidden)
        fams = graph(hidden) if graph is not None else self._propagate_init(hidden)
        for state, fam in zip(states, fams):
            state.fam = fam.expand(batch, -1, -1) if shared else fam
        return states

    def _propagate_init(self, hidden: torch.Tensor, positions=None) -> list[torch.Tensor]:
        """[F_0^0, ..., F_0^{L-1}] from F_0^0 = `hidden` (the last layer's output is never read). `positions`:
        per layer, as `call_layer` takes them (a graph's own copies: the layer calls are then compiled where
        this forward compiles them)."""
        fams = [hidden]
        for idx in range(len(self.layers) - 1):
            step = FAMStep("init", self.inner)
            fams.append(self.call_layer(idx, fams[-1], step, positions[idx] if positions is not None else None,
                                        compiled=positions is not None))
        return fams

    def _fingerprint(self, layer_idx: int, replaying: bool = False):
        """`module_fingerprint` of a layer, once per forward; None when this forward replays no graphs (unless
        the caller is `replaying` one itself: a training backward), or when some of the layer's weights are not
        on the forward's device (offloaded, or on "meta" until a hook loads them for the call): a kept graph
        would read memory such a hook frees."""
        if not (replaying or self.plan.use_graphs or self.graphs_in_training):
            return None
        if layer_idx not in self._fingerprints:
            layer = self.layers[layer_idx]
            device = self.plan.fam_position_ids.device
            resident = all(t.device == device for t in (*layer.parameters(), *layer.buffers()))
            self._fingerprints[layer_idx] = module_fingerprint(layer) if resident else None
        return self._fingerprints[layer_idx]

    def _init_graph(self, hidden: torch.Tensor):
        """A CUDA graph of the forward propagation of the initial FAM through all layers, kept across forwards
        like the chain's steps (inputs: F_0^0 and every layer's FAM positions and rotary embedding), or None."""
        if not self.plan.use_graphs or len(self.layers) < 2:
            return None
        flat, layout = [hidden], []
        for i in range(len(self.layers) - 1):
            tensors, rebuild = _flat_positions(self._positions(i, hidden.shape[0]))
            layout.append((len(flat), len(flat) + len(tensors), rebuild))
            flat += tensors

        def step_fn(*static):
            positions = [rebuild(static[start:stop]) for start, stop, rebuild in layout]
            return tuple(self._propagate_init(static[0], positions)[1:])

        fingerprint = tuple(self._fingerprint(i) for i in range(len(self.layers) - 1))
        if None in fingerprint:
            return None
        graph = cached_chain_step(self.layers, ("init", self.inner, self.compile_steps), fingerprint, step_fn, flat,
                                  len(self.layers) - 1, always_warm_up=self.compile_steps)
        if graph is None:
            return None
        extra = flat[1:]
        return lambda x: [x, *graph.step(x, *extra)]

    def _graph(self, layer_idx: int, kind, tensors: list, steps: int, fingerprint, compute=None):
        """A CUDA graph of this layer's `kind` step ("update": (fam, block_k, block_v) -> (new fam, the FAM's
        keys, values); "probe": (fam,) -> (keys, values); or any other name with `compute(*tensors, positions)`
        -> tensors), kept across forwards (`fam_graphs`), or None. The FAM positions and their rotary embedding
        are graph inputs too: they belong to this forward."""
        if fingerprint is None:
            return None
        position_tensors, rebuild = _flat_positions(self._positions(layer_idx, tensors[0].shape[0]))
        inputs = [*tensors, *position_tensors]
        n = len(tensors)

        def step_fn(*static):
            positions = rebuild(static[n:])
            if compute is not None:
                return tuple(compute(*static[:n], positions=positions))
            if kind == "probe":
                step = FAMStep("probe", self.inner)
                self.call_layer(layer_idx, static[0], step, positions, compiled=True)
                return step.fam_k, step.fam_v
            step = FAMStep("update", self.inner, static[1], static[2], None)
            return self.call_layer(layer_idx, static[0], step, positions, compiled=True), step.fam_k, step.fam_v

        # kept beside the layers (a ModuleList every view of the model shares)
        graph = cached_chain_step(self.layers, (id(self.layers[layer_idx]), self.inner, kind, self.compile_steps),
                                  fingerprint, step_fn, inputs, steps, always_warm_up=self.compile_steps)
        if graph is None:
            return None
        extra = inputs[n:]
        return lambda *x: graph.step(*x, *extra)

    def run(self, layer_idx: int, state: FAMLayerState, tl_k: torch.Tensor, tl_v: torch.Tensor):
        """This layer's chain over the chunk, sequential over blocks, F tokens each.

        Args:
            state: the layer's incoming state (its FAM (B, F, D), and the cached window when continuing).
            tl_k, tl_v: (B, KVH, (M+T)*C, hd) the layer's keys/values on the timeline (`fam_block_attention`).
        Returns:
            fam_k, fam_v: (B, T, KVH, F, hd) the keys/values of the FAM each working block reads;
            fam: (B, F, D) the FAM after this chunk's complete blocks (per row);
            next_k, next_v: (B, KVH, F, hd) the keys/values of that FAM (what the next block reads), or None
                when the plan keeps no state or leaves them to a later chunk (`defers_probe`).
        """
        plan = self.plan
        if plan.settings.fam_update == "sink":
            return self._sink_chain(layer_idx, state)
        T = plan.num_blocks
        kinds = self.schedule(state)
        if recompute_in_backward(self, layer_idx, state, tl_k, tl_v):
            # training: the steps run without autograd and are recomputed one by one in backward
            all_k, all_v, fam = chain_with_recompute(self, layer_idx, kinds, state, tl_k, tl_v)
            fam_k, fam_v = all_k[:, :T], all_v[:, :T]
        else:
            ks, vs, fam = self.steps(layer_idx, kinds, state, tl_k, tl_v)
            fam_k = torch.stack(ks[:T], dim=1)  # (B, T, KVH, F, hd)
            fam_v = torch.stack(vs[:T], dim=1)
            all_k = all_v = None
            if plan.keep_state and not self.defers_probe():
                all_k = torch.stack(ks, dim=1)  # (B, steps, KVH, F, hd)
                all_v = torch.stack(vs, dim=1)

        # for the cache: the FAM each row's next block reads, after `complete_blocks` updates (None when deferred)
        next_k = next_v = None
        if plan.keep_state and not self.defers_probe():
            pick = plan.complete_blocks.clamp(max=all_k.shape[1] - 1)[:, None, None, None, None]
            next_k = all_k.gather(1, pick.expand(-1, 1, *all_k.shape[2:]))[:, 0]
            next_v = all_v.gather(1, pick.expand(-1, 1, *all_v.shape[2:]))[:, 0]
        return fam_k, fam_v, fam, next_k, next_v

    def schedule(self, state: FAMLayerState) -> list[str]:
        """The kind of each of this layer's steps over the chunk, block after block (one more step when
        keeping state, unless `defers_probe`: the FAM the next chunk's first block reads):
        "update": every row completes the block and updates its FAM with it;
        "partial": some rows do (rows past their end keep theirs);
        "cached": no update yet in this chunk: the first block reads the cached FAM's keys/values (unless the
            cache left them pending: then "probe");
        "probe": the keys/values of a FAM no update in this chunk has read yet (a trailing partial block, or
            the block after the chunk, for the cache)."""
        plan = self.plan
        T = plan.num_blocks
        kinds = []
        for t in range(T + (1 if plan.keep_state and not self.defers_probe() else 0)):
            if t < plan.max_complete:
                kinds.append("update" if t < plan.min_complete else "partial")
            elif t == 0 and state.win_k is not None and not state.fam_pending:
                kinds.append("cached")
            elif t < T or plan.max_complete == T:
                kinds.append("probe")
            else:
                break
        return kinds

    def defers_probe(self) -> bool:
        """Whether this chunk leaves the keys/values of its last FAM to a later chunk (`FAMLayerState.fam_pending`):
        every row ends on a block boundary, so the next chunk either completes a block (its first update computes
        them) or reads them inside the block (`probe` there), and the chunk's extra "probe" step would be spent
        on keys a following chunk of blocks never reads."""
        plan = self.plan
        return plan.keep_state and plan.min_complete == plan.num_blocks and plan.settings.fam_update != "sink"

    def probe(self, layer_idx: int, fam: torch.Tensor):
        """The keys/values (B, KVH, F, hd) of FAM `fam` at this layer (a "probe" step: replayed from a CUDA graph
        where this forward may)."""
        fingerprint = self._fingerprint(layer_idx)
        if fingerprint is not None and (graph := self._graph(layer_idx, "probe", [fam], 1, fingerprint)) is not None:
            return graph(fam)
        _, k, v = self.step(layer_idx, 0, "probe", fam, None, None, None)
        return k, v

    def steps(self, layer_idx: int, kinds: list[str], state: FAMLayerState, tl_k: torch.Tensor,
              tl_v: torch.Tensor, record: list | None = None):
        """Run the steps `kinds` (`schedule`) from the state's FAM. Returns per step the keys/values of the FAM
        its block reads ((B, KVH, F, hd) each) and the FAM after the last step. `record`, when given, receives
        each step's incoming FAM (what `chain_with_recompute` recomputes a step from).

        Where the plan allows CUDA graphs, the chunk's update steps replay in groups of `fam_graphs.GROUP_STEPS`
        (one graph of that many updates), the remaining ones one graph step at a time; when recording, one at a
        time."""
        plan = self.plan
        fam = state.fam  # (B, F, D)
        ks, vs = [], []
        group = graph = None
        size, grouped = group_steps(), 0  # the leading `grouped` update steps replay in groups of `size`
        fingerprint = self._fingerprint(layer_idx)
        if plan.min_complete > 0:  # CUDA graphs of the update steps, where the plan allows them
            if record is None and 1 < size <= plan.min_complete:
                group = self._graph(layer_idx, "update_group", [fam, *self.block_slices(0, tl_k, tl_v, size)],
                                    plan.min_complete, fingerprint, compute=self._update_group(layer_idx))
                grouped = plan.min_complete // size * size if group is not None else 0
            if plan.min_complete > grouped:
                graph = self._graph(layer_idx, "update", [fam, *self.block_slices(0, tl_k, tl_v)],
                                    plan.min_complete - grouped, fingerprint)
        for t, kind in enumerate(kinds):
            if record is not None:
                record.append(fam)
            if t < grouped:  # same computations, replayed `size` at a time
                if t % size == 0:
                    fam, k, v = group(fam, *self.block_slices(t, tl_k, tl_v, size))
                    ks += k.unbind(1)
                    vs += v.unbind(1)
                continue
            if kind == "update" and graph is not None:  # same computation, replayed
                fam, k, v = graph(fam, *self.block_slices(t, tl_k, tl_v))
            elif kind == "probe":
                k, v = self.probe(layer_idx, fam)
            else:
                fam, k, v = self.step(layer_idx, t, kind, fam, tl_k, tl_v, state)
            ks.append(k)
            vs.append(v)
        return ks, vs, fam

    def _update_group(self, layer_idx: int):
        """The computation of an "update_group" graph: (fam, the keys/values of G consecutive blocks
        (B, KVH, G * C, hd)) -> (the FAM after their updates, the keys/values of the FAM each of them reads
        (B, G, KVH, F, hd))."""
        C = self.plan.settings.block_size

        def compute(fam, block_k, block_v, positions):
            ks, vs = [], []
            for i in range(block_k.shape[2] // C):
                blk = slice(i * C, (i + 1) * C)
                step = FAMStep("update", self.inner, block_k[:, :, blk], block_v[:, :, blk], None)
                fam = self.call_layer(layer_idx, fam, step, positions, compiled=True)
                ks.append(step.fam_k)
                vs.append(step.fam_v)
            return fam, torch.stack(ks, dim=1), torch.stack(vs, dim=1)

        return compute

    def block_slices(self, t: int, tl_k: torch.Tensor, tl_v: torch.Tensor, count: int = 1):
        """The keys/values of working blocks t .. t + count - 1 on the timeline: (B, KVH, count * C, hd) each."""
        C, M = self.plan.settings.block_size, self.plan.settings.memory_segments
        blk = slice((M + t) * C, (M + t + count) * C)
        return tl_k[:, :, blk], tl_v[:, :, blk]

    def step(self, layer_idx: int, t: int, kind: str, fam: torch.Tensor, tl_k, tl_v, state: FAMLayerState,
             block=None, positions=None):
        """One eager step of kind `kind` (`schedule`) at block t from FAM `fam` (B, F, D). Returns the FAM
        after it and the keys/values of the FAM block t reads ((B, KVH, F, hd) each). `block`: the block's
        keys/values to use instead of the slices of `tl_k`, `tl_v`; `positions`: as `call_layer` takes them."""
        if kind == "cached":
            lay = self.plan.layouts[layer_idx]
            return fam, state.win_k[:, :, lay.fam], state.win_v[:, :, lay.fam]
        if kind == "probe":
            step = FAMStep("probe", self.inner)
            self.call_layer(layer_idx, fam, step, positions)
            return fam, step.fam_k, step.fam_v
        block_k, block_v = block if block is not None else self.block_slices(t, tl_k, tl_v)
        if kind == "update":
            step = FAMStep("update", self.inner, block_k, block_v, None)
            return self.call_layer(layer_idx, fam, step, positions), step.fam_k, step.fam_v
        C, M = self.plan.settings.block_size, self.plan.settings.memory_segments
        block_ok = self.plan.timeline_ok[:, (M + t) * C:(M + t + 1) * C]
        step = FAMStep("update", self.inner, block_k, block_v, block_ok)
        new = self.call_layer(layer_idx, fam, step, positions)
        done = self.plan.complete_blocks > t  # (B,)
        return torch.where(done[:, None, None], new, fam), step.fam_k, step.fam_v

    def _sink_chain(self, layer_idx: int, state: FAMLayerState):
        """fam_update "sink": no update; every block reads the keys/values of the initial FAM (the same in
        every block's frame), computed once per forward. Same return values as `run`."""
        step = FAMStep("probe", self.inner)
        self.call_layer(layer_idx, state.fam, step)
        k, v = step.fam_k, step.fam_v  # (B, KVH, F, hd)
        T, keep = self.plan.num_blocks, self.plan.keep_state
        fam_k = k[:, None].expand(k.shape[0], T, *k.shape[1:])
        fam_v = v[:, None].expand(v.shape[0], T, *v.shape[1:])
        return fam_k, fam_v, state.fam, (k if keep else None), (v if keep else None)
