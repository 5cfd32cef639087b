"""CUDA graphs for the FAM chain on a GPU (inference; training opts in through `fam_chain_grad.TRAINING_GRAPHS`).

The FAM chain calls a decoder layer on F tokens once per block, one block after another. On a GPU each
such call is a few dozen small kernels, and launching them costs more than running them: the GPU waits
for the host. Where every row of the batch updates its FAM (all steps of a long chunk but a trailing
partial block), the steps have the same shapes, so one step is captured into a CUDA graph and replayed
for the others: one launch per step instead of dozens, the same kernels on the same weights. A chunk's
updates replay `GROUP_STEPS` at a time (a graph of that many consecutive steps, `fam_chain.FAMChain.steps`),
the rest one at a time. The "probe" step (the keys of a FAM no update has read yet: a trailing partial block's,
or those a chunk ending on a block boundary left to the next, `FAMChain.defers_probe`) is captured the same way.

Graphs are kept across forwards, per model, per step (layer and kind) and per input shapes, so a stream
read in chunks captures once and replays ever after. A graph replays the kernels it recorded on the memory
it recorded: it stays right while weights change *in place*, but not when a weight is replaced by another
tensor, a module is swapped, or Python control flow inside the layer changes (an adapter enabled, disabled,
merged or switched; a hook added). Each graph therefore carries a fingerprint of its layer
(`module_fingerprint`: every submodule's type and mode, the address, shape and dtype of every parameter and
buffer, the value of every plain attribute such as PEFT's active and merged adapters and scalings, and
the hooks) and of the global switches that choose kernels (autocast, TF32, sdpa backends); a step whose
fingerprint differs is captured again. Every tensor a step reads besides the weights (the FAM, the block's
keys and values, the rotary embedding of the FAM positions) is an input copied into static buffers, which
all of a model's graphs of the same input shapes share (`KeptGraphs`).

A capture costs about one eager run of its steps (two the first time: a warm-up on the capture stream), so a
step is captured when its chunk has at least `MIN_GRAPH_STEPS` of them, or when the same step comes a second time.
If a layer cannot be captured (an operation that synchronises with the host, weights offloaded to the
CPU, ...), the chain runs eagerly, with a warning once per model.
"""

from __future__ import annotations

import warnings
import weakref
from collections import OrderedDict
from collections.abc import Callable, Sequence

import torch

# fewer steps than this in a chunk are captured only when the same step comes again: a capture costs about one
# eager step (not tuned: the H100 runs measured 16 and 256 steps per capture)
MIN_GRAPH_STEPS = 8
# a chunk's update steps replay in groups of this many, one graph per group: one launch, one copy of the group's
# block keys/values in and one copy of its FAM keys/values out, where single steps take a launch and six copies
# each (the host's share of a step, which fused steps would leave as the bound). Read at each forward
# (`group_steps`); 1 or less: every update replays alone
GROUP_STEPS = 8
# input signatures whose graphs a model keeps (least recently used dropped first): a batch size uses up to four
# (the update group, the update step, the probe, the initial FAM's propagation), so this keeps two batch sizes.
# Each holds a graph per layer, with its activations (a few MB per layer at batch 8 for a 1B model), and one set
# of static inputs the layers share
MAX_CACHED_SHAPES = 8

StepFn = Callable[..., tuple[torch.Tensor, ...]]


def group_steps() -> int:
    """`GROUP_STEPS` as it is now (read at each forward)."""
    return GROUP_STEPS


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
    """One captured step of one layer: `step_fn(*inputs) -> outputs` (tensors). Inputs are copied into static
    buffers (`buffers`, when given: other graphs' of the same input shapes); outputs are returned as fresh
    tensors (the graph's own buffers are overwritten by the next replay)."""

    def __init__(self, step_fn: StepFn, inputs: Sequence[torch.Tensor], key=None, always_warm_up: bool = False,
                 buffers: Sequence[torch.Tensor] | None = None):
        if buffers is None:
            self.inputs = [x.new_empty(x.shape).copy_(x) for x in inputs]
        else:
            self.inputs = list(buffers)
            for buffer, x in zip(self.inputs, inputs):
                buffer.copy_(x)
        self.key = (key, tuple((tuple(x.shape), x.dtype) for x in inputs))
        self.always_warm_up = always_warm_up
        self.outputs = tuple(self._capture(step_fn))

    def _capture(self, step_fn: StepFn):
        device = self.inputs[0].device
        side = _capture_stream(device)  # capture is not allowed on the default stream
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):
            if self.always_warm_up or (side, self.key) not in _WARMED_UP:
                # one eager step on the capture stream first: libraries (cuBLAS workspaces, lazily loaded
                # kernels) initialise on first use, which must not happen inside a capture; a compiled step
                # (`fam_compile`) compiles again wherever its layer's Python state changed
                step_fn(*self.inputs)
                _WARMED_UP.add((side, self.key))
            self.graph = torch.cuda.CUDAGraph()
            self.graph.capture_begin(capture_error_mode="thread_local")
            try:
                outputs = step_fn(*self.inputs)
            finally:
                self.graph.capture_end()
        torch.cuda.current_stream(device).wait_stream(side)
        return outputs

    def _replay(self) -> None:
        self.graph.replay()  # recomputes self.outputs from the static inputs

    def step(self, *inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        for buffer, x in zip(self.inputs, inputs):
            buffer.copy_(x)
        self._replay()
        return tuple(out.clone() for out in self.outputs)


_FAILED_ATTR = "_fam_cuda_graphs_failed"
_CAPTURE_STREAMS: dict[int, torch.cuda.Stream] = {}
_WARMED_UP: set = set()  # (stream, step key) pairs that already ran eagerly on their capture stream
# per model: input signature -> its `KeptGraphs`, most recently used last. Kept beside the model, not on it, so that
# copying or pickling a model never meets a graph.
_CACHES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


class KeptGraphs:
    """A model's graphs for one input signature: step name -> (fingerprint, graph or None), and the static input
    buffers they all read. Sharing is safe: a graph's inputs are copied in just before its replay, and replays run
    one after another on one stream. It keeps one layer's inputs in memory, not one per layer (at batch 8 and
    `GROUP_STEPS` blocks of 1,024 tokens, a 1B model's group inputs take 134 MB)."""

    def __init__(self):
        self.graphs: dict = {}
        self.inputs: list[torch.Tensor] | None = None


def _capture_stream(device: torch.device) -> torch.cuda.Stream:
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _CAPTURE_STREAMS:
        _CAPTURE_STREAMS[index] = torch.cuda.Stream(device)
    return _CAPTURE_STREAMS[index]


def capture_chain_step(owner: torch.nn.Module, step_fn: StepFn, inputs: Sequence[torch.Tensor],
                       key=None, always_warm_up: bool = False, buffers=None) -> ChainGraph | None:
    """A ChainGraph, or None where this model's layers cannot be captured (remembered on `owner`).
    `key` names the step (e.g. the layer): a step runs once eagerly on the capture stream before its first
    capture in this process, or before every capture when `always_warm_up` (a compiled step). `buffers`: the
    static inputs to read (as `ChainGraph` takes them)."""
    if getattr(owner, _FAILED_ATTR, False):
        return None
    try:
        return ChainGraph(step_fn, inputs, key, always_warm_up, buffers)
    except Exception as err:  # noqa: BLE001 - any capture failure falls back to the eager chain
        setattr(owner, _FAILED_ATTR, True)
        warnings.warn(
            f"FAM: the FAM chain could not be captured in a CUDA graph ({type(err).__name__}: {err}); it runs "
            "eagerly (slower, same result). Pass fam_cuda_graphs=False to the forward to skip the attempt.",
            stacklevel=3,
        )
        return None


def cached_chain_step(owner: torch.nn.Module, name, fingerprint, step_fn: StepFn, inputs: Sequence[torch.Tensor],
                      steps: int, always_warm_up: bool = False) -> ChainGraph | None:
    """The graph of step `name` (e.g. (layer, kind)) for inputs of these shapes, kept across forwards while
    `fingerprint` (`module_fingerprint` of its layer) holds, else captured now if worth it (`steps` >=
    MIN_GRAPH_STEPS in this chunk, or the step seen before); None where it runs eagerly. `always_warm_up`: as
    `capture_chain_step` takes it."""
    if getattr(owner, _FAILED_ATTR, False):
        return None
    signature = (tuple((tuple(x.shape), x.dtype, x.device) for x in inputs), _global_switches())
    cache = _CACHES.setdefault(owner, OrderedDict())
    here = cache.setdefault(signature, KeptGraphs())
    cache.move_to_end(signature)
    while len(cache) > MAX_CACHED_SHAPES:
        cache.popitem(last=False)
    kept = here.graphs.get(name)
    if kept is not None and kept[0] == fingerprint and kept[1] is not None:
        return kept[1]
    if steps < MIN_GRAPH_STEPS and kept is None:
        here.graphs[name] = (fingerprint, None)  # seen once: captured if it comes again
        return None
    graph = capture_chain_step(owner, step_fn, inputs, key=name, always_warm_up=always_warm_up, buffers=here.inputs)
    if graph is not None:
        here.inputs = graph.inputs
    here.graphs[name] = (fingerprint, graph)
    return graph


def kept_graphs(model: torch.nn.Module):
    """(step name, graph) of every graph kept for `model` (any module holding FAM layers; for tests, diagnostics
    and benchmarks)."""
    for module in model.modules():
        for here in _CACHES.get(module, {}).values():
            yield from ((name, graph) for name, (_, graph) in here.graphs.items() if graph is not None)


def cached_graph_count(model: torch.nn.Module) -> int:
    """How many captured graphs are kept for `model` (any module holding FAM layers; for tests and diagnostics)."""
    return sum(1 for _ in kept_graphs(model))


def clear_graphs(model: torch.nn.Module) -> None:
    """Drop the graphs kept for `model` (their memory returns to PyTorch's caching allocator)."""
    for module in model.modules():
        _CACHES.pop(module, None)


def _global_switches() -> tuple:
    """The process-wide settings that choose which kernels a step launches."""
    backends = torch.backends.cuda
    return (
        torch.is_autocast_enabled("cuda"),
        torch.get_autocast_dtype("cuda"),
        backends.matmul.allow_tf32,
        backends.matmul.allow_bf16_reduced_precision_reduction,
        backends.matmul.allow_fp16_reduced_precision_reduction,
        torch.backends.cudnn.allow_tf32,
        backends.flash_sdp_enabled(),
        backends.mem_efficient_sdp_enabled(),
        backends.math_sdp_enabled(),
        backends.cudnn_sdp_enabled(),
        torch.are_deterministic_algorithms_enabled(),
    )


_MODULE_SLOTS = {"_parameters", "_buffers", "_modules", "_forward_hooks", "_forward_pre_hooks",
                 "_forward_hooks_with_kwargs", "_forward_pre_hooks_with_kwargs", "_forward_hooks_always_called",
                 "_backward_hooks", "_backward_pre_hooks", "_state_dict_hooks", "_state_dict_pre_hooks",
                 "_load_state_dict_pre_hooks", "_load_state_dict_post_hooks", "_non_persistent_buffers_set"}


def module_fingerprint(module: torch.nn.Module) -> tuple:
    """What a graph of `module`'s forward depends on besides its inputs and the values of its weights: see the
    module docstring. Equal fingerprints mean the same kernels on the same memory."""
    parts = []
    for name, sub in module.named_modules(remove_duplicate=False):
        tensors = tuple(
            (key, _tensor_mark(t)) for key, t in (*sub._parameters.items(), *sub._buffers.items()) if t is not None
        )
        hooks = tuple(tuple(getattr(sub, slot, {}).keys()) for slot in ("_forward_hooks", "_forward_pre_hooks"))
        plain = tuple((key, _mark(v)) for key, v in sorted(sub.__dict__.items()) if key not in _MODULE_SLOTS)
        parts.append((name, type(sub), sub.training, tensors, hooks, plain))
    return tuple(parts)


def _tensor_mark(t: torch.Tensor) -> tuple:
    return ("tensor", t.device, t.dtype, tuple(t.shape), tuple(t.stride()), t.data_ptr())


def _mark(value, depth: int = 0):
    """A comparable stand-in for an attribute: plain values as they are, tensors by address and shape,
    containers element by element, anything else by identity."""
    if value is None or isinstance(value, (bool, int, float, str, torch.dtype, torch.device)):
        return value
    if isinstance(value, torch.Tensor):
        return _tensor_mark(value)
    if depth < 3 and isinstance(value, (list, tuple, set, frozenset)):
        items = sorted(value, key=repr) if isinstance(value, (set, frozenset)) else value
        return (type(value).__name__, tuple(_mark(v, depth + 1) for v in items))
    if depth < 3 and isinstance(value, dict):
        return ("dict", tuple((repr(k), _mark(v, depth + 1)) for k, v in value.items()))
    return ("object", id(value))
