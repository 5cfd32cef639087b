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

Where each part lives, in the order a forward runs them:
- `fam_plan`: `make_plan` lays the chunk out once per forward, as an immutable `FAMPlan`;
- `fam_core` (here): `FAMRun`, the plan plus the per-layer states, and the registered attention function;
- `fam_block_attention`: `BlockAttention`, one layer's attention over the chunk (steps 1 and 3 above);
- `fam_chain`: `FAMChain`, one layer's FAM chain (step 2) and the initial FAM of a fresh sequence.
"""

from __future__ import annotations

import torch
from torch import nn

from .fam_adapters import DecoderAdapter
from .fam_block_attention import BlockAttention
from .fam_chain import FAMChain
from .fam_compat import FAM_ATTENTION_PREFIX, in_fam_forward, inner_attention_function
from .fam_plan import FAMPlan, make_plan
from .fam_settings import FAMSettings
from .fam_state import FAMLayerState

# Set on the modules of a base model that a FAM model shares (`FAMForCausalLM.from_base_model`): called
# outside a FAM forward, they run the base model's own attention instead of failing.
SHARED_BASE_FLAG = "_fam_shared_base"


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


class FAMRun:
    """One forward call, shared by all layers (passed through the model as `fam_run`): the forward's plan
    and what changes while the layers run, the per-layer states and final FAM.

    Made by `FAMRun.start` before the decoder runs. Each layer's attention reads its `FAMLayerState` from
    `states` and, when the plan keeps state, leaves the updated state there for the cache.

    Attributes:
        plan: the forward's `FAMPlan` (immutable).
        chain: the forward's `FAMChain`; blocks: its `BlockAttention` (both read `plan`).
        states: per layer, the `FAMLayerState` the layer starts from; after the layer ran (and when the
            plan keeps state), the one it leaves for the cache.
        final_fam: per layer, the FAM (B, F, D) after this chunk once the layer ran (None where F == 0).
    """

    def __init__(self, *, plan: FAMPlan, chain: FAMChain, blocks: BlockAttention, states: list[FAMLayerState]):
        self.plan = plan
        self.chain = chain
        self.blocks = blocks
        self.states = states
        self.final_fam: list[torch.Tensor | None] = [None] * len(chain.layers)
        self._incoming: dict[int, FAMLayerState] = {}  # the state each layer started from, once it ran

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
        """Lay out one chunk and make its run.

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
            cuda_graphs: replay the FAM chain's steps from CUDA graphs kept across forwards where possible
                (inference on CUDA; see `fam_graphs`). Same result.
        """
        # 1. the plan: where the chunk's tokens lie, block counts, positions, block shapes
        plan = make_plan(
            settings=settings, adapter=adapter, decoder=decoder, chunk_mask=chunk_mask, fam_init=fam_init,
            states=states, keep_state=keep_state, fam_state=fam_state, position_offset=position_offset,
            cuda_graphs=cuda_graphs,
        )
        # 2. the chain and the block attention, both reading the plan
        chain = FAMChain(plan, adapter, decoder, inner)
        blocks = BlockAttention(plan, adapter, decoder, inner, chain)
        # 3. the states the layers start from: the stream's, or (fresh) empty windows and each layer's F_0^l
        if states is None:
            states = chain.initial_states(fam_init, fam_state)
        return cls(plan=plan, chain=chain, blocks=blocks, states=states)

    def block_attention(self, module: nn.Module, query, key, value, kwargs) -> torch.Tensor:
        """Block attention of one layer for the whole chunk, FAM chain included. Returns (B, n, H, hd)."""
        layer_idx = module.layer_idx
        if layer_idx in self._incoming:
            # gradient checkpointing runs the layer again in backward: same input state, same values; the
            # forward's results stay (the recomputed FAM would pin the recomputed layer's graph to the run,
            # and with it to `fam_state`, keeping every layer's activations until the backward ends)
            out, _, _ = self.blocks(module, self._incoming[layer_idx], query, key, value, kwargs)
            return out
        self._incoming[layer_idx] = self.states[layer_idx]
        out, new_state, fam = self.blocks(module, self.states[layer_idx], query, key, value, kwargs)
        self.final_fam[layer_idx] = fam
        if new_state is not None:
            self.states[layer_idx] = new_state
        return out
