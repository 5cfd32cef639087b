"""The FAM chain in training runs without autograd and is recomputed step by step in backward
(`hf_fam/modeling/fam_chain_grad.py`): the same loss and gradients as the chain recorded by autograd, with and
without gradient checkpointing, LoRA, padding (rows completing different numbers of blocks, trailing partial
blocks) and a stream continued from a cache; the path is really taken, the checkpoint's recompute does not run
the chain again, autocast holds in backward, and a layer with active dropout falls back to the recorded chain."""

from __future__ import annotations

import pytest
import torch
from conftest import assert_close, padding_mask, random_ids, tiny_model
from peft import get_peft_model

import hf_fam
from hf_fam.modeling import fam_chain_grad
from hf_fam.modeling.fam_chain import FAMChain
from hf_fam.modeling.fam_chain_grad import eager_autograd_chain
from hf_fam.modeling.fam_compat import enable_checkpointing
from hf_fam.training import fam_lora_config

C, M, F, N = 4, 1, 2, 22  # 22 = 5 blocks and a partial one


def _model(family, with_lora, checkpointing, lora_dropout=0.0):
    model = hf_fam.FAMForCausalLM.from_base_model(tiny_model(family), block_size=C, memory_segments=M, fam_length=F)
    if checkpointing:
        enable_checkpointing(model)  # activation_checkpointing_enable where transformers has it
    if with_lora:
        torch.manual_seed(3)
        model = get_peft_model(model, fam_lora_config(model, r=4, init_lora_weights=False, lora_dropout=lora_dropout))
    return model.train()


def _grads(model, ids, mask=None, **kwargs):
    model.zero_grad(set_to_none=True)
    embeds = model.get_input_embeddings()(ids).detach().requires_grad_(True)
    labels = ids if mask is None else ids.masked_fill(mask == 0, -100)
    out = model(inputs_embeds=embeds, attention_mask=mask, labels=labels, use_cache=False, **kwargs)
    out.loss.backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    return out.loss.detach(), embeds.grad, grads


def _assert_same(actual, expected):
    loss, emb_grad, grads = actual
    ref_loss, ref_emb_grad, ref_grads = expected
    assert_close(loss, ref_loss, atol=1e-6, msg="loss")
    assert_close(emb_grad, ref_emb_grad, atol=1e-5, msg="input gradient")
    assert grads.keys() == ref_grads.keys()
    assert any("fam" in name for name in grads)
    for name in grads:
        assert_close(grads[name], ref_grads[name], atol=1e-5, msg=name)


@pytest.fixture
def counts(monkeypatch):
    """How often the recomputed chain ran (`apply`), the chain's steps ran without autograd in a forward, and a
    single step ran (forward steps and the backward's recomputed steps)."""
    seen = {"apply": 0, "steps": 0, "step": 0}
    for owner, name, key in ((fam_chain_grad._RecomputedChain, "apply", "apply"), (FAMChain, "steps", "steps"),
                             (FAMChain, "step", "step")):
        original = getattr(owner, name)

        def counted(*args, _original=original, _key=key, **kwargs):
            seen[_key] += 1
            return _original(*args, **kwargs)

        monkeypatch.setattr(owner, name, staticmethod(counted) if name == "apply" else counted)
    return seen


@pytest.mark.parametrize("checkpointing", [False, True], ids=["plain", "checkpointing"])
@pytest.mark.parametrize("with_lora", [False, True], ids=["full", "lora"])
def test_same_gradients_as_the_recorded_chain(family, with_lora, checkpointing, counts):
    ids = random_ids(2, N, seed=21)
    mask = padding_mask([N, 13], N)  # the second row completes 3 blocks of the first's 5: partial steps
    model = _model(family, with_lora, checkpointing)
    with eager_autograd_chain():
        expected = _grads(model, ids, mask)
    assert counts["apply"] == 0
    actual = _grads(model, ids, mask)
    layers = len(hf_fam.training.unwrap_fam_model(model).get_decoder().layers)
    assert counts["apply"] == layers * (2 if checkpointing else 1), "the recomputed chain was not the path taken"
    _assert_same(actual, expected)


def test_the_checkpoint_recompute_does_not_run_the_chain_again(counts):
    model = _model("llama", with_lora=True, checkpointing=True)
    ids = random_ids(1, N, seed=22)
    layers = len(hf_fam.training.unwrap_fam_model(model).get_decoder().layers)
    _grads(model, ids)
    # forward: every layer's steps once; recompute: none; backward: each update and probe step once more
    steps_per_layer = N // C + 1  # 5 updates, then a probe for the trailing partial block
    assert counts["steps"] == layers
    assert counts["step"] == 2 * layers * steps_per_layer


def test_the_last_memory_read_by_nothing_costs_no_backward():
    """Input of whole blocks, no cache: the last update's new FAM is read by no block, so autograd never
    backpropagates through that update's attention and MLP; the recomputed chain skips it too (same gradients,
    the same number of MLP outputs given a gradient)."""
    model = _model("llama", with_lora=True, checkpointing=True)
    ids = random_ids(2, 6 * C, seed=28)  # 6 whole blocks: 6 updates, no probe
    seen = []

    def count_gradient(module, args, out):
        if out.requires_grad:
            out.register_hook(lambda grad: seen.append(1))

    for layer in hf_fam.training.unwrap_fam_model(model).get_decoder().layers:
        layer.mlp.register_forward_hook(count_gradient)
    with eager_autograd_chain():
        expected = _grads(model, ids)
    traversed = len(seen)
    seen.clear()
    actual = _grads(model, ids)
    _assert_same(actual, expected)
    assert len(seen) == traversed, "the recomputed chain backpropagated a step autograd would not"


def test_a_stream_continued_from_a_cache_trains_the_same(family):
    """A chunk continuing a cache (read without gradients) starts from the cached FAM: its first block reads
    the cached FAM's keys (a "cached" step) and the steps after it recompute from there."""
    model = _model(family, with_lora=True, checkpointing=False)
    first, second = random_ids(1, 10, seed=23), random_ids(1, 9, seed=24)

    def grads():
        with torch.no_grad():
            cache = model(input_ids=first, use_cache=True).past_key_values
        model.zero_grad(set_to_none=True)
        out = model(input_ids=second, labels=second, past_key_values=cache, use_cache=True)
        out.loss.backward()
        return out.loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    with eager_autograd_chain():
        ref_loss, ref_grads = grads()
    loss, found = grads()
    assert_close(loss, ref_loss, atol=1e-6, msg="loss")
    assert found.keys() == ref_grads.keys() and found
    for name in found:
        assert_close(found[name], ref_grads[name], atol=1e-5, msg=name)


def test_backward_recomputes_under_the_forward_autocast():
    model = _model("llama", with_lora=True, checkpointing=False)
    seen = []
    layer = hf_fam.training.unwrap_fam_model(model).get_decoder().layers[0]
    layer.mlp.register_forward_hook(lambda *args: seen.append(
        (torch._C._current_graph_task_id() >= 0, torch.is_autocast_enabled("cpu"))))
    ids = random_ids(1, N, seed=25)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model(input_ids=ids, labels=ids, use_cache=False).loss
    loss.backward()
    in_backward = [autocast for backward, autocast in seen if backward]
    assert in_backward and all(in_backward), "the backward's recomputed steps ran without the forward's autocast"


def test_active_dropout_falls_back_to_the_recorded_chain(counts):
    """Dropout draws new random numbers when a step is recomputed, so such a layer's chain is recorded by
    autograd as it runs; in eval mode the same model takes the recomputed chain."""
    model = _model("llama", with_lora=True, checkpointing=False, lora_dropout=0.1)
    ids = random_ids(1, N, seed=26)
    _grads(model, ids)
    assert counts["apply"] == 0
    model.eval()
    _grads(model, ids)
    assert counts["apply"] > 0


@pytest.mark.parametrize("tail", [2, 0], ids=["probe", "whole-blocks"])
def test_training_graphs_wiring_equals_the_recorded_chain(monkeypatch, tail):
    """`TRAINING_GRAPHS` (CUDA only, off by default): the forward's steps replay the inference graphs and each
    update step's backward replays a graph of `step_vjp`. A stand-in graph class replays the captured functions
    eagerly through the same static buffers (tests/test_cuda_graphs.py), so the wiring (inputs, positions,
    outputs, gradient accumulation) is checked here; a real capture is checked by benchmarks/cuda_checks.py."""
    from test_cuda_graphs import ReplayedEagerly

    from hf_fam.modeling import fam_graphs

    kinds = []

    class Counted(ReplayedEagerly):
        def _replay(self):
            kinds.append(self.key[0][2])
            super()._replay()

    monkeypatch.setattr(fam_chain_grad, "graphs_usable", lambda device, requested: requested)
    monkeypatch.setattr(fam_graphs, "ChainGraph", Counted)
    fam_graphs.clear_graphs(torch.nn.Module())
    model = _model("llama", with_lora=True, checkpointing=True)
    ids = random_ids(2, 12 * C + tail, seed=27)  # 12 update steps a layer: captured at once (MIN_GRAPH_STEPS)
    with eager_autograd_chain():
        expected = _grads(model, ids)
    monkeypatch.setattr(fam_chain_grad, "TRAINING_GRAPHS", True)
    for _ in range(2):  # captured, then kept
        kinds.clear()
        actual = _grads(model, ids)
        _assert_same(actual, expected)
    layers = len(hf_fam.training.unwrap_fam_model(model).get_decoder().layers)
    # per layer: 12 update steps replayed in forward, and in backward (the capture computes the first) all of
    # them when a probe reads the last FAM; without one, the last update's new FAM is read by nothing and its
    # backward runs eagerly, for the block's keys and values only
    assert kinds.count("update") == layers * 12
    assert sum(1 for k in kinds if isinstance(k, tuple) and k[0] == "vjp") == layers * (12 if tail else 11)
    fam_graphs.clear_graphs(model)
