"""The FAM chain under autograd: run without it, recomputed one step at a time in backward.

In training, each layer's chain calls the decoder layer once per block on F tokens. Recorded by autograd, every
such call pays host time for each operation (PEFT's LoRA layers, saved tensors, gradient checkpointing's hooks),
and with gradient checkpointing the layer's recompute in backward runs the whole chain a second time.
`chain_with_recompute` runs a layer's chain as one autograd `Function` instead:

- forward: the steps run without autograd, keeping only each step's incoming FAM (B, F, D);
- the checkpoint's recompute of the layer (a second call for the same layer in the same forward) returns the
  forward's results instead of running the steps again (same values: the layer's input is the same);
- backward: the steps are recomputed in reverse, one at a time, each from its kept FAM with autograd on, and
  backpropagated at once; the gradient of a step's incoming FAM goes to the step before it. A step whose new
  FAM nothing reads (the last update of a forward without a cache) is backpropagated for its keys and values
  only, as autograd would.

So a layer's chain costs one forward without autograd plus a forward and a backward per step (it was two
recorded forwards and a backward), and its backward holds one step's activations at a time. The layer's
trainable parameters are inputs of the Function: their gradients reach `.grad` through autograd as usual
(accumulation, hooks, DistributedDataParallel). The gradients are the same as the plain autograd chain's, up to
the order of float sums (tests/test_chain_recompute.py).

Where a step could not be recomputed the same (dropout active in the layer draws new random numbers; a cached
window that itself carries gradients), the chain runs under plain autograd, as `eager_autograd_chain` also asks.
"""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING

import torch
from torch import nn

from .fam_graphs import graphs_usable

if TYPE_CHECKING:  # the chain imports this module
    from .fam_chain import FAMChain
    from .fam_state import FAMLayerState

_EAGER = [False]  # set by `eager_autograd_chain`

# CUDA graphs in training: the forward's steps (no autograd) replayed from the graphs inference keeps, and each
# update step's backward (`step_vjp`) captured once per layer and replayed. Off until checked on a GPU
# (`benchmarks/cuda_checks.py` turns it on for its checks); the CPU tests run the same `step_vjp` eagerly.
TRAINING_GRAPHS = False


@contextlib.contextmanager
def eager_autograd_chain():
    """Within this context the FAM chain is recorded by autograd step by step (the reference the recomputed
    chain is tested and measured against)."""
    previous = _EAGER[0]
    _EAGER[0] = True
    try:
        yield
    finally:
        _EAGER[0] = previous


def dropout_active(module: nn.Module) -> bool:
    """Whether a call of `module` draws random numbers: a dropout with p > 0, or an attention dropout, in
    training mode."""
    for sub in module.modules():
        if not sub.training:
            continue
        if isinstance(sub, nn.modules.dropout._DropoutNd) and sub.p > 0:
            return True
        if float(getattr(sub, "attention_dropout", 0.0) or 0.0) > 0:
            return True
    return False


def trainable_parameters(layer: nn.Module) -> list[nn.Parameter]:
    return [p for p in layer.parameters() if p.requires_grad]


def recompute_in_backward(chain: FAMChain, layer_idx: int, state: FAMLayerState, tl_k, tl_v) -> bool:
    """Whether this layer's chain runs as `chain_with_recompute`: autograd is recording something the chain
    reads, and every step can be recomputed the same in backward."""
    if not torch.is_grad_enabled() or _EAGER[0]:
        return False
    layer = chain.layers[layer_idx]
    needs_grad = (state.fam.requires_grad or tl_k.requires_grad or tl_v.requires_grad
                  or bool(trainable_parameters(layer)))
    if not needs_grad:
        return False
    if state.win_k is not None and (state.win_k.requires_grad or state.win_v.requires_grad):
        return False
    return not dropout_active(layer)


def chain_with_recompute(chain: FAMChain, layer_idx: int, kinds: list[str], state: FAMLayerState, tl_k, tl_v):
    """This layer's chain (steps `kinds`, `FAMChain.schedule`) as one autograd Function. Returns the keys and
    values of the FAM every step's block reads, (B, steps, KVH, F, hd) each, and the FAM after the last step."""
    params = trainable_parameters(chain.layers[layer_idx])
    recorded = chain.recorded.pop(layer_idx, None)  # the forward's results, when this call is the layer's recompute
    return _RecomputedChain.apply(chain, layer_idx, kinds, state, recorded, state.fam, tl_k, tl_v, *params)


def _autocast_states(device_type: str) -> list[tuple[str, torch.dtype, bool]]:
    """The autocast contexts active now (for the device and the CPU, with the cast cache's switch: off in a
    checkpointed training forward), to enter again in backward."""
    types, cache = {device_type, "cpu"}, torch.is_autocast_cache_enabled()
    return [(t, torch.get_autocast_dtype(t), cache) for t in sorted(types) if torch.is_autocast_enabled(t)]


def _training_graphs(chain: FAMChain, device: torch.device) -> bool:
    """Whether this training forward replays the chain from CUDA graphs: `TRAINING_GRAPHS`, and the forward may
    use graphs at all (called where autograd is off, as in the Function's forward)."""
    return TRAINING_GRAPHS and graphs_usable(device, chain.plan.graphs_requested)


def step_vjp(chain: FAMChain, layer_idx: int, t: int, kind: str, state: FAMLayerState, needs_block: tuple,
             wanted: list):
    """One step's backward as a function of tensors: `vjp(fam, block_k, block_v, grad_new, grad_k, grad_v,
    positions=None)` recomputes the step (`FAMChain.step`) from its incoming FAM with autograd and returns the
    gradients of the FAM, of the block's keys and values where `needs_block` says so, and of the parameters
    `wanted` (zeros where a gradient does not reach). Block and `grad_new` are None for a probe (it reads no
    block and leaves the FAM as it is). The same function runs eagerly or captured in a CUDA graph."""

    def vjp(fam, block_k, block_v, grad_new, grad_k, grad_v, positions=None):
        with torch.enable_grad():
            fam = fam.detach().requires_grad_(True)
            inputs, block = [fam], None
            if block_k is not None:
                block = [b.detach().requires_grad_(needed) for b, needed in zip((block_k, block_v), needs_block)]
                inputs += [b for b in block if b.requires_grad]
            new, k, v = chain.step(layer_idx, t, kind, fam, None, None, state, block=block, positions=positions)
            outputs, grads = [k, v], [grad_k, grad_v]
            if grad_new is not None:
                outputs.append(new)
                grads.append(grad_new)
            found = torch.autograd.grad(outputs, inputs + wanted, grads, allow_unused=True)
        return [torch.zeros_like(x) if g is None else g for g, x in zip(found, inputs + wanted)]

    return vjp


class _RecomputedChain(torch.autograd.Function):
    @staticmethod
    def forward(ctx, chain, layer_idx, kinds, state, recorded, fam, tl_k, tl_v, *params):
        graphs = _training_graphs(chain, tl_k.device)
        if recorded is None:
            fams: list[torch.Tensor] = []
            chain.graphs_in_training = graphs
            try:
                ks, vs, last = chain.steps(layer_idx, kinds, state, tl_k, tl_v, record=fams)
            finally:
                chain.graphs_in_training = False
            all_k, all_v = torch.stack(ks, dim=1), torch.stack(vs, dim=1)  # (B, steps, KVH, F, hd)
            if getattr(chain.layers[layer_idx], "gradient_checkpointing", False):
                chain.recorded[layer_idx] = (fams, all_k, all_v, last)  # for the layer's recompute
        else:  # the checkpoint's recompute: same input, same results; fresh outputs for its discarded graph
            fams, all_k, all_v, last = recorded
        ctx.chain, ctx.layer_idx, ctx.kinds, ctx.state, ctx.fams = chain, layer_idx, kinds, state, fams
        ctx.graphs = graphs
        ctx.autocast = _autocast_states(tl_k.device.type)
        # the parameters themselves, not through save_for_backward: under gradient checkpointing a saved tensor
        # comes back as another object, which a kept graph of the backward would hold on to
        ctx.params = params
        ctx.save_for_backward(tl_k, tl_v)
        # an output nothing reads gets None in backward, not zeros: the last FAM, when no block reads it (a
        # training forward without a cache), then costs no backward, as autograd would not traverse it either
        ctx.set_materialize_grads(False)
        ctx.kv_meta = dict(size=all_k.shape, dtype=all_k.dtype, device=all_k.device)
        return all_k.clone(), all_v.clone(), last.clone()

    @staticmethod
    def backward(ctx, grad_k, grad_v, grad_fam):
        tl_k, tl_v = ctx.saved_tensors
        grad_k, grad_v = (torch.zeros(**ctx.kv_meta) if g is None else g for g in (grad_k, grad_v))
        params = ctx.params
        chain, layer_idx, state, kinds = ctx.chain, ctx.layer_idx, ctx.state, ctx.kinds
        needs_fam, needs_k, needs_v = ctx.needs_input_grad[5:8]
        wanted = [i for i, needed in enumerate(ctx.needs_input_grad[8:]) if needed]
        wanted_params = [params[i] for i in wanted]
        grad_tl = [torch.zeros_like(tl) if needed else None for tl, needed in ((tl_k, needs_k), (tl_v, needs_v))]
        grad_params: list[torch.Tensor | None] = [None] * len(params)
        graph = None
        with contextlib.ExitStack() as stack:
            for device_type, dtype, cache in ctx.autocast:
                stack.enter_context(torch.autocast(device_type, dtype=dtype, cache_enabled=cache))
            if ctx.graphs and "update" in kinds:  # each update step's backward replayed from one graph
                first = kinds.index("update")
                vjp = step_vjp(chain, layer_idx, first, "update", state, (needs_k, needs_v), wanted_params)
                fingerprint = chain._fingerprint(layer_idx, replaying=True)
                marks = (fingerprint, tuple(p.requires_grad for p in chain.layers[layer_idx].parameters()))
                graph = chain._graph(
                    layer_idx, ("vjp", needs_k, needs_v), [ctx.fams[first], *chain.block_slices(first, tl_k, tl_v),
                                                           torch.zeros_like(ctx.fams[first]), grad_k[:, first],
                                                           grad_v[:, first]],
                    kinds.count("update"), marks if fingerprint is not None else None, compute=vjp)
            for t in reversed(range(len(kinds))):
                kind = kinds[t]
                if kind == "cached":
                    continue  # the cached window carries no gradient (`recompute_in_backward`)
                block = chain.block_slices(t, tl_k, tl_v) if kind != "probe" else (None, None)
                grad_new = grad_fam if kind != "probe" else None  # None: the step's new FAM is read by nothing
                args = (ctx.fams[t], *block, grad_new, grad_k[:, t], grad_v[:, t])
                if kind == "update" and graph is not None and grad_new is not None:
                    found = list(graph(*args))
                else:
                    found = step_vjp(chain, layer_idx, t, kind, state, (needs_k, needs_v), wanted_params)(*args)
                if kind == "probe" and grad_fam is not None:  # a probe passes the FAM on
                    grad_fam = grad_fam + found[0]
                else:
                    grad_fam = found[0]
                rest = iter(found[1:])
                if kind != "probe":
                    slot = slice(*_block_bounds(chain, t))
                    for grad, needed in zip(grad_tl, (needs_k, needs_v)):
                        if needed:
                            grad[:, :, slot] += next(rest)
                for i, g in zip(wanted, rest):
                    grad_params[i] = g if grad_params[i] is None else grad_params[i] + g
        return (None, None, None, None, None, grad_fam if needs_fam else None, *grad_tl, *grad_params)


def _block_bounds(chain: FAMChain, t: int) -> tuple[int, int]:
    C, M = chain.plan.settings.block_size, chain.plan.settings.memory_segments
    return (M + t) * C, (M + t + 1) * C
