"""CUDA graphs for the FAM chain (inference on a GPU).

The FAM chain calls a decoder layer on F tokens once per block, one block after another. On a GPU each
such call is a few dozen small kernels, and launching them costs more than running them: the GPU waits
for the host. Where every row of the batch updates its FAM (all steps of a long chunk but a trailing
partial block), the steps have the same shapes, so one step is captured into a CUDA graph and replayed
for the others: one launch per step instead of dozens, the same kernels on the same weights.

A graph is captured per layer *and per forward*: it reads the weights as they are during that forward, so
adapters enabled, merged, swapped or replaced between forwards are never replayed stale. A capture costs
about one eager step (two the first time: a warm-up on the capture stream), so it is only done for chunks
of at least `MIN_GRAPH_STEPS` blocks. If a layer cannot be captured (an operation that synchronises with
the host, weights offloaded to the CPU, ...), the chain runs eagerly, with a warning once per model.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable

import torch

# fewer steps than this in a chunk run eagerly: a capture costs about one eager step (not tuned: the H100
# runs measured 16 and 256 steps per capture)
MIN_GRAPH_STEPS = 8

StepFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor, torch.Tensor]]


def graphs_usable(device: torch.device, requested: bool) -> bool:
    """Whether this forward may replay its chain from CUDA graphs: asked for, on CUDA, without autograd,
    and not itself inside a capture or a compiled region."""
    return (
        requested
        and device.type == "cuda"
        and not torch.is_grad_enabled()
        and not torch.compiler.is_compiling()
        and not torch.cuda.is_current_stream_capturing()
    )


class ChainGraph:
    """One captured FAM update step of one layer: (fam (B, F, D), block_k, block_v (B, KVH, C, hd)) ->
    (new fam, the FAM's keys, values). Inputs are copied into static buffers; outputs are returned as
    fresh tensors (the graph's own buffers are overwritten by the next replay)."""

    def __init__(self, step_fn: StepFn, fam: torch.Tensor, block_k: torch.Tensor, block_v: torch.Tensor, key=None):
        self.fam = fam.new_empty(fam.shape).copy_(fam)
        self.block_k = block_k.new_empty(block_k.shape).copy_(block_k)
        self.block_v = block_v.new_empty(block_v.shape).copy_(block_v)
        self.key = (key, tuple(fam.shape), tuple(block_k.shape), fam.dtype)
        self.out, self.fam_k, self.fam_v = self._capture(step_fn)

    def _capture(self, step_fn: StepFn):
        device = self.fam.device
        side = _capture_stream(device)  # capture is not allowed on the default stream
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):
            if (side, self.key) not in _WARMED_UP:
                # one eager step on the capture stream first: libraries (cuBLAS workspaces, lazily loaded
                # kernels) initialise on first use, which must not happen inside a capture
                step_fn(self.fam, self.block_k, self.block_v)
                _WARMED_UP.add((side, self.key))
            self.graph = torch.cuda.CUDAGraph()
            self.graph.capture_begin(capture_error_mode="thread_local")
            try:
                outputs = step_fn(self.fam, self.block_k, self.block_v)
            finally:
                self.graph.capture_end()
        torch.cuda.current_stream(device).wait_stream(side)
        return outputs

    def _replay(self) -> None:
        self.graph.replay()  # recomputes self.out, self.fam_k, self.fam_v from the static inputs

    def step(self, fam: torch.Tensor, block_k: torch.Tensor, block_v: torch.Tensor):
        self.fam.copy_(fam)
        self.block_k.copy_(block_k)
        self.block_v.copy_(block_v)
        self._replay()
        return self.out.clone(), self.fam_k.clone(), self.fam_v.clone()


_FAILED_ATTR = "_fam_cuda_graphs_failed"
_CAPTURE_STREAMS: dict[int, torch.cuda.Stream] = {}
_WARMED_UP: set = set()  # (stream, step key) pairs that already ran eagerly on their capture stream


def _capture_stream(device: torch.device) -> torch.cuda.Stream:
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _CAPTURE_STREAMS:
        _CAPTURE_STREAMS[index] = torch.cuda.Stream(device)
    return _CAPTURE_STREAMS[index]


def capture_chain_step(owner: torch.nn.Module, step_fn: StepFn, fam, block_k, block_v, key=None) -> ChainGraph | None:
    """A ChainGraph, or None where this model's layers cannot be captured (remembered on `owner`).
    `key` names the step (e.g. the layer): a step runs once eagerly on the capture stream before its first
    capture in this process."""
    if getattr(owner, _FAILED_ATTR, False):
        return None
    try:
        return ChainGraph(step_fn, fam, block_k, block_v, key)
    except Exception as err:  # noqa: BLE001 - any capture failure falls back to the eager chain
        setattr(owner, _FAILED_ATTR, True)
        warnings.warn(
            f"FAM: the FAM chain could not be captured in a CUDA graph ({type(err).__name__}: {err}); it runs "
            "eagerly (slower, same result). Pass fam_cuda_graphs=False to the forward to skip the attempt.",
            stacklevel=3,
        )
        return None
