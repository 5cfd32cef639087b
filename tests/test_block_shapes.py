"""Regular blocks attend to the keys they can see and no others; the result is the fully masked computation's.

A block whose memory blocks are complete or empty in every row (the first M blocks of a sequence have fewer
than M memory blocks) takes only its filled memory blocks, and no FAM keys when no row reads the FAM (the
zero-shot sink before the first block leaves the window). These tests pin the classification and compare
the trimmed path with the one that masks every block row by row (`fam_plan.classify_blocks` forced to irregular).
"""

from __future__ import annotations

import warnings

import pytest
import torch
from conftest import assert_close, padding_mask, random_ids, tiny_model

import hf_fam
from hf_fam.modeling import fam_plan


def fam_model(C, M, F, update="paper", family="llama"):
    base = tiny_model(family)
    model = hf_fam.FAMForCausalLM.from_base_model(base, block_size=C, memory_segments=M, fam_length=F)
    model.config.fam_update = update
    return model.eval()


def shapes_seen(model, ids, mask=None):
    seen = []
    original = fam_plan.classify_blocks

    def spy(settings, timeline_ok3, blocks_before):
        seen.append(original(settings, timeline_ok3, blocks_before))
        return seen[-1]

    fam_plan.classify_blocks = spy
    try:
        with torch.no_grad():
            model(ids, attention_mask=mask)
    finally:
        fam_plan.classify_blocks = original
    return seen[0]


def all_irregular(monkeypatch):
    monkeypatch.setattr(fam_plan, "classify_blocks", lambda settings, timeline_ok3, blocks_before:
                        [None] * (timeline_ok3.shape[1] - settings.memory_segments))


def test_the_first_blocks_take_only_their_filled_memory_blocks():
    model = fam_model(4, 2, 2)
    assert shapes_seen(model, random_ids(2, 20)) == [(0, True), (1, True), (2, True), (2, True), (2, True)]
    # a trailing partial block and a padded row make blocks irregular
    assert shapes_seen(model, random_ids(1, 18)) == [(0, True), (1, True), (2, True), (2, True), None]
    mask = padding_mask([20, 11], 20)
    assert shapes_seen(model, random_ids(2, 20), mask) == [(0, True), (1, True), None, None, None]


def test_the_sink_is_read_only_once_the_first_block_has_left_the_window():
    model = fam_model(4, 1, 3, update="sink")
    assert shapes_seen(model, random_ids(1, 16)) == [(0, False), (1, False), (1, True), (1, True)]


@pytest.mark.parametrize("update", ["paper", "sink"])
@pytest.mark.parametrize("C,M,F,N", [(4, 2, 2, 23), (3, 3, 1, 24), (5, 0, 3, 20), (4, 1, 0, 17)])
def test_trimmed_keys_equal_the_masked_computation(monkeypatch, family, update, C, M, F, N):
    model = fam_model(C, M, F, update, family)
    ids = random_ids(2, N, seed=4)
    mask = padding_mask([N, N - 5], N, "left")
    with torch.no_grad():
        got = model(ids).logits, model(ids, attention_mask=mask).logits
    all_irregular(monkeypatch)
    with torch.no_grad():
        expected = model(ids).logits, model(ids, attention_mask=mask).logits
    assert_close(got[0], expected[0], msg=f"{family} {update} C={C} M={M} F={F}")
    assert_close(got[1], expected[1], mask=mask, msg=f"{family} {update} padded")


def test_trimmed_keys_give_the_masked_gradients(monkeypatch):
    model = fam_model(4, 2, 2).train()
    ids = random_ids(2, 24, seed=5)

    def grads():
        model.zero_grad()
        model(ids, labels=ids).loss.backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    got = grads()
    all_irregular(monkeypatch)
    expected = grads()
    assert got.keys() == expected.keys() and len(got) > 0
    for name in got:
        assert_close(got[name], expected[name], msg=name)


def test_streaming_chunks_keep_the_shapes_exact(monkeypatch):
    model = fam_model(4, 2, 2)
    ids = random_ids(1, 30, seed=6)
    with torch.no_grad():
        whole = model(ids).logits
        cache, parts = None, []
        for chunk in ids.split(9, dim=1):
            out = model(chunk, cache=cache, use_cache=True)
            cache, parts = out.cache, parts + [out.logits]
    assert_close(torch.cat(parts, dim=1), whole)


def _masked_only(monkeypatch):
    from hf_fam.modeling import fam_block_attention

    monkeypatch.setattr(fam_block_attention, "split_attention_usable", lambda *a: False)


@pytest.mark.parametrize("update", ["paper", "sink"])
@pytest.mark.parametrize("C,M,F,N", [(4, 2, 2, 23), (8, 1, 3, 40), (5, 0, 3, 20), (4, 1, 0, 17)])
def test_split_attention_equals_the_masked_call(monkeypatch, family, update, C, M, F, N):
    """Without autograd on the CPU, regular blocks take the mask-free split path; the values are the masked
    call's (fp32, 1e-5), padded rows and streamed chunks included."""
    from hf_fam.modeling import fam_split_attention

    calls = []
    real = fam_split_attention.split_attention
    monkeypatch.setattr("hf_fam.modeling.fam_block_attention.split_attention", lambda *a: calls.append(1) or real(*a))
    model = fam_model(C, M, F, update, family)
    ids = random_ids(2, N, seed=7)
    mask = padding_mask([N, N - 6], N, "left")
    with torch.no_grad():
        got = model(ids).logits, model(ids, attention_mask=mask).logits
    assert calls  # every tiny family here runs sdpa
    _masked_only(monkeypatch)
    with torch.no_grad():
        expected = model(ids).logits, model(ids, attention_mask=mask).logits
    assert_close(got[0], expected[0], msg=f"{family} {update} C={C} M={M} F={F}")
    assert_close(got[1], expected[1], mask=mask, msg=f"{family} {update} padded")


def test_training_keeps_the_masked_call(monkeypatch):
    """The kernel's log-sum-exp carries no gradient: with autograd on, the split path must not run."""
    monkeypatch.setattr("hf_fam.modeling.fam_block_attention.split_attention",
                        lambda *a: (_ for _ in ()).throw(AssertionError("split path under autograd")))
    model = fam_model(4, 2, 2).train()
    model(random_ids(1, 20), labels=random_ids(1, 20)).loss.backward()
    with torch.inference_mode(), pytest.raises(AssertionError, match="split path"):
        model(random_ids(1, 20))


def test_split_attention_in_bfloat16_is_within_its_rounding():
    model = fam_model(8, 2, 4).to(torch.bfloat16)
    ids = random_ids(1, 48, seed=8)
    with torch.no_grad():
        got = model(ids).logits.float()
    from hf_fam.modeling import fam_block_attention

    original = fam_block_attention.split_attention_usable
    fam_block_attention.split_attention_usable = lambda *a: False
    try:
        with torch.no_grad():
            expected = model(ids).logits.float()
    finally:
        fam_block_attention.split_attention_usable = original
    assert (got - expected).abs().max().item() < 0.05 * expected.abs().max().item()


def test_split_attention_only_where_it_computes_the_same():
    from hf_fam.modeling.fam_split_attention import split_attention_usable

    q = torch.zeros(1, 2, 4, 8)
    plain = {"dropout": 0.0, "scaling": 0.35, "fam_run": None, "position_ids": None, "use_cache": False}
    with torch.no_grad():
        assert split_attention_usable("sdpa", q, plain)
        assert not split_attention_usable("eager", q, plain)  # eager families (soft-capping) keep their function
        assert not split_attention_usable("sdpa", q, {**plain, "softcap": 50.0})
        assert not split_attention_usable("sdpa", q, {**plain, "dropout": 0.1})
        assert not split_attention_usable("sdpa", q.half(), plain)
    assert not split_attention_usable("sdpa", q, plain)  # autograd on


def test_a_refusing_kernel_falls_back_to_the_masked_call_once(monkeypatch):
    """Where a device's fused kernel refuses an input (an old GPU, an odd head size), block attention warns once,
    takes the masked call, and computes the same values; on the CPU such an error is a bug and is raised."""
    from hf_fam.modeling import fam_block_attention, fam_split_attention

    model = fam_model(4, 2, 2)
    ids = random_ids(1, 24, seed=3)
    with torch.no_grad():
        expected = model(ids).logits

    def refuse(*args):
        raise RuntimeError("no kernel for these inputs")

    monkeypatch.setattr(fam_block_attention, "split_attention", refuse)
    with torch.no_grad(), pytest.raises(RuntimeError, match="no kernel"):
        model(ids)  # the CPU does not refuse
    monkeypatch.setattr(fam_split_attention, "REFUSABLE_DEVICES", ("cpu",))
    monkeypatch.setattr(fam_split_attention, "_REFUSED", set())
    with torch.no_grad(), pytest.warns(UserWarning, match="refused this input"):
        got = model(ids).logits
    assert_close(got, expected)
    assert not fam_split_attention.split_attention_usable("sdpa", ids.new_zeros(1, 2, 4, 8, dtype=torch.float32), {})
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("error")
        assert_close(model(ids).logits, expected)  # remembered: the masked call, no second warning
