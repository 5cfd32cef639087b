"""A chunk that ends on a block boundary leaves the keys of its last FAM to the next chunk (`FAMChain.defers_probe`).

Its extra "probe" step would compute keys that a following chunk of complete blocks computes again in its first
update; the cache marks them pending (`FAMLayerState.fam_pending`), and the first chunk inside the block (decoding)
computes them there. The schedules' agreement (tests/test_streaming.py: chunks of C and token by token end on every
boundary) checks the values; here: where the step is skipped, and where it is not.
"""

from __future__ import annotations

import pytest
import torch
from conftest import assert_close, padding_mask, random_ids, tiny_model

import hf_fam
from hf_fam.modeling import fam_chain

C = 4


@pytest.fixture
def probes(monkeypatch):
    """How many probe layer calls ran (one per layer each)."""
    seen = {"probe": 0}
    original = fam_chain.FAMChain.call_layer

    def counted(self, layer_idx, hidden, step, *args, **kwargs):
        seen["probe"] += step.mode == "probe"
        return original(self, layer_idx, hidden, step, *args, **kwargs)

    monkeypatch.setattr(fam_chain.FAMChain, "call_layer", counted)
    return seen


def fam_model(**kw):
    return hf_fam.FAMForCausalLM.from_base_model(tiny_model("llama"), block_size=C, memory_segments=1, fam_length=3,
                                                 **kw).eval()


def stream(model, ids, sizes, mask=None):
    cache, outs, states = None, [], []
    start = 0
    for size in sizes:
        m = None if mask is None else mask[:, : start + size]
        out = model(ids[:, start : start + size], attention_mask=m, cache=cache, use_cache=True)
        cache, start = out.cache, start + size
        outs.append(out.logits)
        states.append([s.fam_pending for s in cache.layer_states])
    return torch.cat(outs, dim=1), states


def test_chunks_of_whole_blocks_probe_only_where_a_block_is_read_inside(probes):
    """Chunks of 3 whole blocks: no probe at all; then tokens inside the next block: one probe per layer, at the
    first of them; then a chunk ending inside a block probes for its partial block as before."""
    model = fam_model()
    layers = model.config.num_hidden_layers
    ids = random_ids(1, 9 * C + 3 + 2 * C + 2, seed=40)
    with torch.no_grad():
        whole = model(ids, use_cache=False).logits
        probes["probe"] = 0
        got, pending = stream(model, ids, [3 * C] * 3 + [1, 1, 1] + [2 * C + 2])
    assert pending[:3] == [[True] * layers] * 3
    assert pending[3:6] == [[False] * layers] * 3
    # the first token inside the block: one probe per layer; the last chunk (completes that block and two more,
    # then a partial one): one per layer, for its partial block (and the cache's next FAM, the same one)
    assert probes["probe"] == layers + layers
    assert pending[6] == [False] * layers
    assert_close(got, whole, atol=1e-5)


def test_rows_that_end_elsewhere_keep_the_probe(probes):
    """Left padding: one row ends on a boundary, the other inside a block. The step is kept (some row's next block
    reads the keys the cache holds) and the stream equals the parallel forward."""
    model = fam_model()
    n = 3 * C
    mask = padding_mask([n, n - 2], n + 2 * C, side="left")
    ids = random_ids(2, n + 2 * C, seed=41)
    with torch.no_grad():
        whole = model(ids, attention_mask=mask, use_cache=False).logits
        got, pending = stream(model, ids, [n, C, C], mask=mask)
    assert not any(any(p) for p in pending)
    assert_close(got, whole, atol=1e-5, mask=mask.bool())


def test_generate_from_a_prompt_of_whole_blocks_equals_recomputing():
    """A prompt of whole blocks leaves its FAM's keys pending; the first generated token computes them, and
    greedy decoding equals recomputing every step without a cache, for beam search too (the cache's rows are
    reordered while pending)."""
    model = fam_model()
    ids = random_ids(1, 4 * C, seed=42)
    with torch.no_grad():
        cached = model.generate(ids, max_new_tokens=6, do_sample=False)
        uncached = model.generate(ids, max_new_tokens=6, do_sample=False, use_cache=False)
        beams = model.generate(ids, max_new_tokens=6, do_sample=False, num_beams=2)
        beams_uncached = model.generate(ids, max_new_tokens=6, do_sample=False, num_beams=2, use_cache=False)
    assert torch.equal(cached, uncached)
    assert torch.equal(beams, beams_uncached)


def test_sink_memory_keeps_its_keys():
    """fam_update "sink" reads one memory's keys in every block: computed once per forward, never pending."""
    model = fam_model(fam_update="sink")
    ids = random_ids(1, 6 * C, seed=43)
    with torch.no_grad():
        whole = model(ids, use_cache=False).logits
        got, pending = stream(model, ids, [2 * C] * 3)
    assert not any(any(p) for p in pending)
    assert_close(got, whole, atol=1e-5)
