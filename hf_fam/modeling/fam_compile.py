"""The FAM chain's layer calls compiled with `torch.compile`, inside the chain's CUDA graphs (opt-in: `COMPILE_STEPS`).

A chain step is the decoder layer on F tokens: a few dozen small kernels (norms, rotary, the projections, a
small attention, SiLU, residuals). A CUDA graph (`fam_graphs`) removes their launch cost but not their number:
on an H200 at the Llama-3.2-1B shape a replayed step takes about 6 times the time to read the layer's weights
(docs/performance.md). Compiling the layer call fuses its element-wise kernels (inductor) while the layer's own
modules stay in use: PEFT's LoRA layers and hooks are traced, not replaced, and dynamo's guards recompile
where their Python state changes (an adapter disabled, merged, switched).

What is compiled is one call of a decoder layer on FAM tokens, the same function for every layer of a model
(one compilation serves all its layers: the weights are inputs of the compiled graph). Each model and kind of
step (the initial FAM's propagation, the update, the probe) gets a function of its own (a copy of the code:
dynamo keeps its compiled variants per code object, a few of them each: batch sizes, adapter states, dtypes),
so that one model's variants never use up another's, and a model's variants run compiled until that limit.

Only the graphs' steps are compiled: a compiled function is warmed up (compiled) outside the capture, and
replays then run none of its Python. The eager chain (CPU, autograd, steps too few to capture) is untouched.
Off by default until measured on a GPU: `fam_compile.COMPILE_STEPS = True` turns it on for the process
(`hf-fam bench --compile-chain`). Where compiling fails, the step runs uncompiled, with a warning once. A
checkpoint loaded with `trust_remote_code=True` runs its own copy of this module, beside its `modeling_fam`:
`sys.modules[type(model).__module__.rsplit(".", 1)[0] + ".fam_compile"].COMPILE_STEPS = True` there.
"""

from __future__ import annotations

import types
import warnings
import weakref

import torch

# compile the layer calls of the chain's CUDA graphs (inference on CUDA); off until measured on a GPU
COMPILE_STEPS = False
# the torch.compile backend ("inductor" fuses; the tests use "aot_eager" to check the tracing quickly)
COMPILE_BACKEND = "inductor"

# per model (its ModuleList of layers): (kind, backend) -> compiled function. Kept beside the model, not on it
_COMPILED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_FAILED: set = set()  # backends that failed to compile a step in this process


def _layer_call(layer, hidden, position_ids, embeddings, step):
    out = layer(hidden, attention_mask=None, position_ids=position_ids, position_embeddings=embeddings,
                fam_step=step)
    return out[0] if isinstance(out, tuple) else out


def _compiled(owner: torch.nn.Module, kind: str, backend):
    """The compiled layer call for this model and kind of step: a fresh copy of `_layer_call`'s code, so that
    dynamo gives it a cache of its own."""
    functions = _COMPILED.setdefault(owner, {})
    if (kind, backend) not in functions:
        name = f"fam_{kind}_step"
        code = _layer_call.__code__.replace(co_name=name)
        function = types.FunctionType(code, _layer_call.__globals__, name)
        functions[(kind, backend)] = torch.compile(function, backend=backend, dynamic=False)
    return functions[(kind, backend)]


def compiling_steps() -> bool:
    """`COMPILE_STEPS` as it is now (read at each forward)."""
    return COMPILE_STEPS


def layer_call(owner: torch.nn.Module, layer, hidden: torch.Tensor, position_ids, embeddings, step,
               compiled: bool) -> torch.Tensor:
    """Decoder layer `layer` (one of `owner`'s) on FAM tokens `hidden` (B, F, D) with `step` (a
    `fam_chain.FAMStep`, whose mode picks the function), compiled when `compiled` and compiling has not failed
    with this backend."""
    backend = COMPILE_BACKEND
    if not compiled or backend in _FAILED:
        return _layer_call(layer, hidden, position_ids, embeddings, step)
    try:
        return _compiled(owner, step.mode, backend)(layer, hidden, position_ids, embeddings, step)
    except Exception as err:  # noqa: BLE001 - a step that cannot be compiled runs as it is
        _FAILED.add(backend)
        warnings.warn(
            f"FAM: the FAM chain's layer call could not be compiled with torch.compile ({type(err).__name__}: "
            f"{err}); it runs uncompiled (same result). Set hf_fam.modeling.fam_compile.COMPILE_STEPS = False to "
            "skip the attempt.",
            stacklevel=2,
        )
        return _layer_call(layer, hidden, position_ids, embeddings, step)


def reset() -> None:
    """Forget the compiled functions and failures of this process (tests)."""
    _COMPILED.clear()
    _FAILED.clear()
