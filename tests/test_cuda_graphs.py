"""The FAM chain's CUDA-graph path (hf_fam/modeling/fam_graphs.py), checked on the CPU.

A real capture needs a GPU (benchmarks/cuda_checks.py compares graphs on/off there). Here a stand-in
graph class "replays" the captured step function through the same static input buffers, so the wiring
in the chain — which steps replay, how the FAM, keys and values flow in and out, padding, streaming —
is checked against the eager chain on every run.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from conftest import assert_close, padding_mask, random_ids, tiny_model
from test_families import build as build_family

import hf_fam
from hf_fam.modeling import fam_graphs, fam_plan


class ReplayedEagerly(fam_graphs.ChainGraph):
    replays = 0

    def _capture(self, step_fn):
        self._step_fn = step_fn
        return step_fn(self.fam, self.block_k, self.block_v)

    def _replay(self):
        type(self).replays += 1
        # like a graph replay: recompute the outputs from the static inputs (values, not new inputs)
        out, k, v = self._step_fn(self.fam, self.block_k, self.block_v)
        self.out, self.fam_k, self.fam_v = out, k, v


@pytest.fixture
def graphs_on_cpu(monkeypatch):
    # as on CUDA: asked for and without autograd
    monkeypatch.setattr(fam_plan, "graphs_usable", lambda device, requested: requested and not torch.is_grad_enabled())
    monkeypatch.setattr(fam_graphs, "ChainGraph", ReplayedEagerly)
    ReplayedEagerly.replays = 0
    return ReplayedEagerly


def fam_model(family="llama", C=4, M=1, F=3):
    base = build_family("gemma2") if family == "gemma2" else tiny_model(family)  # gemma2: soft-capping, local layers
    return hf_fam.FAMForCausalLM.from_base_model(base, block_size=C, memory_segments=M, fam_length=F).eval()


@pytest.mark.parametrize("family", ["llama", "gemma2"])
def test_replayed_chain_equals_eager_chain(graphs_on_cpu, family):
    C = 4
    model = fam_model(family, C=C)
    ids = random_ids(2, 12 * C + 3, seed=5)  # 12 complete blocks and a partial one
    mask = padding_mask([12 * C + 3, 9 * C + 1], 12 * C + 3, side="left")
    with torch.no_grad():
        eager = model(ids, attention_mask=mask, fam_cuda_graphs=False)
        assert graphs_on_cpu.replays == 0
        replayed = model(ids, attention_mask=mask)
    layers = model.config.num_hidden_layers
    # the shorter row completes 9 blocks: steps 0..8 replay (a capture computes nothing), the rest run eagerly
    assert graphs_on_cpu.replays == layers * 9
    assert_close(replayed.logits, eager.logits, atol=0.0, mask=mask.bool())
    for got, want in zip(replayed.fam_state, eager.fam_state):
        assert_close(got, want, atol=0.0)


def test_replayed_streaming_equals_eager(graphs_on_cpu):
    C = 4
    model = fam_model(C=C)
    ids = random_ids(1, 40 * C, seed=9)
    with torch.no_grad():
        whole = model(ids, use_cache=False, fam_cuda_graphs=False).logits
        cache, outs = None, []
        for s in range(0, ids.shape[1], 10 * C + 3):  # chunks of 10+ blocks continue the stream
            out = model(ids[:, s : s + 10 * C + 3], cache=cache, use_cache=True)
            cache, outs = out.cache, outs + [out.logits]
    assert graphs_on_cpu.replays > 0
    assert_close(torch.cat(outs, dim=1), whole, atol=1e-5)


def test_short_chunks_and_training_do_not_capture(graphs_on_cpu):
    model = fam_model(C=4)
    with torch.no_grad():
        model(random_ids(1, 4 * (fam_graphs.MIN_GRAPH_STEPS - 1)))
    assert graphs_on_cpu.replays == 0
    model.train()
    ids = random_ids(1, 4 * 12)
    model(ids, labels=ids).loss.backward()  # autograd: graphs_usable is asked with grad enabled


def test_graphs_usable_only_on_cuda_without_autograd():
    cpu = torch.device("cpu")
    with torch.no_grad():
        assert not fam_graphs.graphs_usable(cpu, True)
    if torch.cuda.is_available():
        cuda = torch.device("cuda")
        assert not fam_graphs.graphs_usable(cuda, True)  # autograd on
        with torch.no_grad():
            assert fam_graphs.graphs_usable(cuda, True)
            assert not fam_graphs.graphs_usable(cuda, False)


def test_failed_capture_falls_back_once_with_a_warning():
    owner = torch.nn.Linear(1, 1)
    x = torch.zeros(1, 2, 3)

    def step(fam, k, v):
        return fam, k, v

    with pytest.warns(UserWarning, match="could not be captured in a CUDA graph"):
        assert fam_graphs.capture_chain_step(owner, step, x, x, x) is None  # CPU tensors: no CUDA stream
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert fam_graphs.capture_chain_step(owner, step, x, x, x) is None  # remembered: no second try


def test_generate_and_patched_models_take_the_switch(graphs_on_cpu):
    """`fam_cuda_graphs` is a forward argument: generate() passes it on, for FAM and patched models alike."""
    model = fam_model(C=4)
    patched = hf_fam.patch(tiny_model("llama"), block_size=4, memory_segments=1, fam_length=3).eval()
    ids = random_ids(1, 4 * 10)
    for m in (model, patched):
        with_graphs = m.generate(ids, max_new_tokens=5, do_sample=False)
        replays = graphs_on_cpu.replays
        assert replays > 0
        eager = m.generate(ids, max_new_tokens=5, do_sample=False, fam_cuda_graphs=False)
        assert graphs_on_cpu.replays == replays
        assert torch.equal(with_graphs, eager)
