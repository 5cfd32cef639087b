"""The chain's graph steps compiled with torch.compile (hf_fam/modeling/fam_compile.py), checked on the CPU.

Compiling is opt-in (`fam_compile.COMPILE_STEPS`) and happens only inside the chain's CUDA graphs. Here the
stand-in graph of tests/test_cuda_graphs.py replays the captured step functions, so the compiled calls run
on the CPU: with the "aot_eager" backend (dynamo's tracing and AOT autograd, no code generation: seconds) in
the default suite, and with inductor (generated C++) in a slow test. benchmarks/cuda_checks.py compares
compiled graphs with the eager chain on a GPU.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from conftest import assert_close, random_ids
from test_cuda_graphs import fam_model, graphs_on_cpu  # noqa: F401 - the stand-in graph fixture
from test_families import build as build_family
from torch._dynamo.utils import counters

import hf_fam
from hf_fam.modeling import fam_compile, fam_graphs
from hf_fam.tiny import tiny_model

C = 4


@pytest.fixture
def compiled_on_cpu(graphs_on_cpu, monkeypatch):  # noqa: F811
    monkeypatch.setattr(fam_compile, "COMPILE_STEPS", True)
    monkeypatch.setattr(fam_compile, "COMPILE_BACKEND", "aot_eager")
    fam_compile.reset()
    torch._dynamo.reset()
    counters.clear()
    yield graphs_on_cpu
    fam_compile.reset()
    torch._dynamo.reset()


def compiled_graphs() -> int:
    """Graphs dynamo compiled since the counters were cleared."""
    return counters["stats"].get("unique_graphs", 0)


# The graph counts below, and that no graph breaks, are torch 2.13's (CI's). torch 2.6.0 breaks its graphs at a
# call inside the step and traces transformers' layer wrappers into graphs of their own (8 where 2.13 compiles 4),
# with the same results: there only the results are checked.
COUNTS_ARE_TORCHS = tuple(int(part) for part in torch.__version__.split("+")[0].split(".")[:2]) >= (2, 13)
# dynamo's limit on compiled variants per function: `recompile_limit` from torch 2.7, `cache_size_limit` before
RECOMPILE_LIMIT = "recompile_limit" if hasattr(torch._dynamo.config, "recompile_limit") else "cache_size_limit"


def assert_graphs(expected: int) -> None:
    if COUNTS_ARE_TORCHS:
        assert compiled_graphs() == expected


def family_model(family: str):
    base = tiny_model(family).eval() if family in ("llama", "mistral", "gemma") else build_family(family)
    return hf_fam.FAMForCausalLM.from_base_model(base, block_size=C, memory_segments=1, fam_length=3).eval()


@pytest.mark.parametrize("family", ["llama", "mistral", "gemma", "gemma2", "qwen3", "phi3"])
def test_compiled_steps_equal_the_eager_chain(compiled_on_cpu, family):
    """Two forwards capture every graph (the group of 8 updates, then the 2 single updates, the probe and the
    initial FAM's propagation); each kind is compiled once for all layers, without a graph break, and the logits
    and final FAM equal the eager chain's."""
    model = family_model(family)
    ids = random_ids(2, 10 * C + 3, seed=5)
    with torch.no_grad():
        eager = model(ids, fam_cuda_graphs=False)
        assert compiled_graphs() == 0
        outs = [model(ids) for _ in range(3)]
    assert compiled_on_cpu.replays > 0
    for out in outs:
        assert_close(out.logits, eager.logits, atol=1e-5)
        for got, want in zip(out.fam_state, eager.fam_state):
            assert_close(got, want, atol=1e-5)
    # init, probe, and update twice (on slices of the group's keys/values, and on a single step's own: other
    # strides): one compilation serves both layers
    assert_graphs(4)
    assert dict(counters["graph_break"]) == {} or not COUNTS_ARE_TORCHS


def test_compiled_and_plain_graphs_are_kept_apart(compiled_on_cpu, monkeypatch):
    """Whether a graph's step was compiled is part of its name: switching compiling off captures plain graphs
    instead of replaying the compiled ones, and back on replays the compiled ones again."""
    model = fam_model(C=C)
    layers = model.config.num_hidden_layers
    ids = random_ids(1, 10 * C, seed=3)
    with torch.no_grad():
        model(ids, use_cache=False)
        assert compiled_on_cpu.captures == layers
        monkeypatch.setattr(fam_compile, "COMPILE_STEPS", False)
        model(ids, use_cache=False)
        assert compiled_on_cpu.captures == 2 * layers
        monkeypatch.setattr(fam_compile, "COMPILE_STEPS", True)
        model(ids, use_cache=False)
    # the compiled update groups replay; the 2 single updates and the initial FAM's propagation come the second
    # time under their compiled names (the plain ones came once), so they are captured now
    assert compiled_on_cpu.captures == 3 * layers + 1


def test_compiled_steps_follow_lora_changes(compiled_on_cpu):
    """PEFT's adapter state (enabled, disabled, merged) is Python state the compiled call reads: dynamo's guards
    compile again where it changes, and every forward equals the eager chain."""
    peft = pytest.importorskip("peft")
    model = peft.get_peft_model(
        fam_model(C=C), peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    ).eval()
    ids = random_ids(1, 9 * C, seed=6)

    def both():
        return model(ids, use_cache=False).logits, model(ids, use_cache=False, fam_cuda_graphs=False).logits

    with torch.no_grad():
        outs = [both(), both()]
        with model.disable_adapter():
            outs.append(both())
        model.merge_adapter()
        outs.append(both())
        model.unmerge_adapter()
        outs.append(both())
    assert compiled_on_cpu.replays > 0 and compiled_graphs() >= 3
    assert not torch.allclose(outs[2][1], outs[0][1])  # the adapter matters, so the checks are not vacuous
    for graphed, eager in outs:
        assert_close(graphed, eager, atol=1e-5)


def test_only_the_graphs_steps_are_compiled(compiled_on_cpu):
    """The eager chain (graphs switched off, a chunk too short to capture, training under autograd) compiles
    nothing."""
    model = fam_model(C=C)
    with torch.no_grad():
        model(random_ids(1, 10 * C), fam_cuda_graphs=False)
        model(random_ids(1, 4 * (fam_graphs.MIN_GRAPH_STEPS - 1)))
    model.train()
    ids = random_ids(1, 10 * C)
    model(ids, labels=ids).loss.backward()
    assert compiled_on_cpu.replays == 0
    assert compiled_graphs() == 0


def test_a_step_that_cannot_compile_runs_uncompiled_with_one_warning(compiled_on_cpu, monkeypatch):
    def broken_backend(graph_module, example_inputs):
        raise RuntimeError("no compiler here")

    monkeypatch.setattr(fam_compile, "COMPILE_BACKEND", broken_backend)
    model = fam_model(C=C)
    ids = random_ids(1, 10 * C, seed=2)
    with torch.no_grad():
        eager = model(ids, use_cache=False, fam_cuda_graphs=False).logits
        with pytest.warns(UserWarning, match="could not be compiled"):
            first = model(ids, use_cache=False).logits
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            second = model(ids, use_cache=False).logits  # remembered: no second try, no second warning
    assert compiled_on_cpu.replays > 0
    for out in (first, second):
        assert_close(out, eager, atol=0.0)


@pytest.mark.slow
def test_inductor_compiled_steps_equal_the_eager_chain(compiled_on_cpu, monkeypatch):
    """Inductor's generated code (C++ on the CPU, Triton on a GPU) fuses the step's element-wise operations:
    fp32 within 1e-5 of the eager chain."""
    monkeypatch.setattr(fam_compile, "COMPILE_BACKEND", "inductor")
    model = fam_model(C=C)
    ids = random_ids(2, 10 * C + 3, seed=7)
    with torch.no_grad():
        eager = model(ids, fam_cuda_graphs=False)
        outs = [model(ids) for _ in range(2)]
    assert_graphs(4)  # init, probe, the update in a group and alone
    for out in outs:
        assert_close(out.logits, eager.logits, atol=1e-5)
        for got, want in zip(out.fam_state, eager.fam_state):
            assert_close(got, want, atol=1e-5)


def test_each_model_has_its_own_compiled_functions(compiled_on_cpu, monkeypatch):
    """dynamo keeps a few compiled variants per function (`recompile_limit`) and runs the rest uncompiled: each
    model and kind of step has a function of its own, so one model's variants never use up another's."""
    monkeypatch.setattr(torch._dynamo.config, RECOMPILE_LIMIT, 1)
    ids = random_ids(1, 10 * C, seed=4)
    with torch.no_grad():
        for family in ("llama", "qwen3"):
            model = family_model(family)
            before = compiled_graphs()
            eager = model(ids, use_cache=False, fam_cuda_graphs=False).logits
            got = model(ids, use_cache=False).logits
            assert_graphs(before + 1)  # the update step, compiled for this model
            assert_close(got, eager, atol=1e-5)
