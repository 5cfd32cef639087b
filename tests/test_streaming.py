"""Streaming (docs/design.md §2): parallel, chunked prefill and token-by-token agree; the cache stays constant."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import assert_close, padding_mask, random_ids, tiny_model

import hf_fam
from hf_fam import FAMCache


def fam_model(family, C, M, F, **kw):
    return hf_fam.FAMForCausalLM.from_base_model(tiny_model(family, **kw), block_size=C, memory_segments=M,
                                                 fam_length=F).eval()


def chunked_logits(model, ids, chunk, mask=None):
    cache, outs = None, []
    for s in range(0, ids.shape[1], chunk):
        m = None if mask is None else mask[:, : s + chunk]
        out = model(ids[:, s : s + chunk], attention_mask=m, cache=cache, use_cache=True)
        cache = out.cache
        outs.append(out.logits)
    return torch.cat(outs, dim=1), cache


@pytest.mark.parametrize("M", [0, 1, 3])
def test_parallel_chunked_and_token_by_token_agree(family, M):
    C, F = 4, 3
    model = fam_model(family, C, M, F)
    ids = random_ids(2, 6 * C + 3, seed=31)  # six block boundaries and a partial block
    with torch.no_grad():
        parallel = model(ids, use_cache=False).logits
        for chunk in (1, 7, C, 3 * C + 5):
            got, _ = chunked_logits(model, ids, chunk)
            assert_close(got, parallel, atol=1e-5, msg=f"{family} M={M} chunk={chunk}")


def test_chunked_prefill_with_left_padding(family):
    C, M, F = 4, 1, 2
    model = fam_model(family, C, M, F)
    ids = random_ids(3, 29, seed=32)
    mask = padding_mask([29, 17, 5], 29, "left")
    with torch.no_grad():
        parallel = model(ids, attention_mask=mask).logits
        for chunk in (1, 6, 11):
            got, _ = chunked_logits(model, ids, chunk, mask)
            assert_close(got, parallel, mask=mask, msg=f"chunk={chunk}")


def test_greedy_generate_matches_recomputing_everything(family):
    model = fam_model(family, 4, 1, 2)
    ids = random_ids(1, 10, seed=33)
    cached = model.generate(ids, max_new_tokens=20, do_sample=False)
    uncached = model.generate(ids, max_new_tokens=20, do_sample=False, use_cache=False)
    assert torch.equal(cached, uncached)


def test_token_by_token_logits_match_parallel_over_generated_text(family):
    model = fam_model(family, 4, 3, 2)
    ids = random_ids(1, 6, seed=34)
    out = model.generate(ids, max_new_tokens=26, do_sample=False, output_logits=True, return_dict_in_generate=True)
    with torch.no_grad():
        parallel = model(out.sequences).logits
    stepwise = torch.stack(out.logits, dim=1)  # logits that chose tokens 6..31
    assert_close(stepwise, parallel[:, 5:-1], atol=1e-4)


def test_left_padded_batch_generates_like_each_prompt_alone(family):
    model = fam_model(family, 4, 1, 2)
    lengths = [13, 7, 2]
    ids = random_ids(3, 13, seed=35)
    mask = padding_mask(lengths, 13, "left")
    batched = model.generate(ids, attention_mask=mask, max_new_tokens=14, do_sample=False, pad_token_id=0)
    for b, n in enumerate(lengths):
        alone = model.generate(ids[b : b + 1, 13 - n :], max_new_tokens=14, do_sample=False, pad_token_id=0)
        assert torch.equal(batched[b, 13:], alone[0, n:]), f"row {b}"


def test_beam_search_matches_uncached():
    model = fam_model("llama", 4, 1, 2)
    ids = random_ids(2, 9, seed=36)
    cached = model.generate(ids, max_new_tokens=10, num_beams=3, do_sample=False)
    uncached = model.generate(ids, max_new_tokens=10, num_beams=3, do_sample=False, use_cache=False)
    assert torch.equal(cached, uncached)


def test_sampling_options_and_stopping_and_streamer():
    from transformers import StoppingCriteria, StoppingCriteriaList
    from transformers.generation.streamers import BaseStreamer

    model = fam_model("llama", 4, 1, 2)
    ids = random_ids(1, 9, seed=37)
    torch.manual_seed(0)
    a = model.generate(ids, max_new_tokens=12, do_sample=True, top_k=20, top_p=0.9, temperature=0.8,
                       repetition_penalty=1.3)
    torch.manual_seed(0)
    b = model.generate(ids, max_new_tokens=12, do_sample=True, top_k=20, top_p=0.9, temperature=0.8,
                       repetition_penalty=1.3, use_cache=False)
    assert torch.equal(a, b)

    class StopAfter(StoppingCriteria):
        def __call__(self, input_ids, scores, **kw):
            return torch.full((input_ids.shape[0],), input_ids.shape[1] >= 14, dtype=torch.bool)

    class Collect(BaseStreamer):
        def __init__(self):
            self.tokens = []

        def put(self, value):
            self.tokens.append(value.flatten().tolist())

        def end(self):
            self.tokens.append("end")

    streamer = Collect()
    out = model.generate(ids, max_new_tokens=30, do_sample=False, stopping_criteria=StoppingCriteriaList([StopAfter()]),
                         streamer=streamer)
    assert out.shape[1] == 14
    assert streamer.tokens[0] == ids[0].tolist() and streamer.tokens[-1] == "end"
    assert [t[0] for t in streamer.tokens[1:-1]] == out[0, 9:].tolist()


def test_patched_model_generates_with_its_fam_cache(family):
    model = hf_fam.patch(tiny_model(family), block_size=4, memory_segments=1, fam_length=2)
    ids = random_ids(1, 11, seed=38)
    out = model(ids, use_cache=True)
    assert isinstance(out.cache, FAMCache)
    assert torch.equal(model.generate(ids, max_new_tokens=9, do_sample=False),
                       model.generate(ids, max_new_tokens=9, do_sample=False, use_cache=False))


def test_cache_size_is_constant_over_a_long_stream():
    C, M, F = 8, 2, 4
    model = fam_model("llama", C, M, F)
    cache, sizes = None, []
    with torch.no_grad():
        for i in range(40):
            out = model(random_ids(2, 13, seed=i), cache=cache, use_cache=True)
            cache = out.cache
            sizes.append(cache.nbytes())
    assert len(set(sizes)) == 1
    kv_heads, head_dim, layers, hidden = 2, 16, 2, 64
    # keys and values of (M+1)·C + F tokens (plus one dump slot for padding writes) and F FAM vectors
    per_row = layers * (2 * ((M + 1) * C + F + 1) * kv_heads * head_dim + F * hidden) * 4
    assert sizes[0] == 2 * per_row + 2 * layers * 2 * 8  # plus two (B,) int64 counters per layer
    assert cache.get_seq_length() == 40 * 13


def test_stream_far_from_the_start_is_exact():
    """Positions are relative to each block: declaring that a stream starts at position 1,000,000 changes
    nothing (absolute RoPE angles there would be off by ~0.03 rad in fp32)."""
    model = fam_model("llama", 4, 1, 2)
    ids = random_ids(1, 30, seed=39)
    with torch.no_grad():
        near, _ = chunked_logits(model, ids, 7)
        cache, outs = None, []
        for s in range(0, 30, 7):
            n = ids[:, s : s + 7].shape[1]
            pos = torch.arange(1_000_000 + s, 1_000_000 + s + n)[None]
            out = model(ids[:, s : s + 7], position_ids=pos, cache=cache, use_cache=True)
            cache, outs = out.cache, outs + [out.logits]
    assert_close(torch.cat(outs, 1), near, atol=1e-5)


def test_cache_copy_branches_the_stream():
    model = fam_model("llama", 4, 1, 2)
    ids = random_ids(1, 21, seed=40)
    with torch.no_grad():
        cache = model(ids[:, :15], use_cache=True).cache
        branch = copy.deepcopy(cache)
        a = model(ids[:, 15:], cache=cache, use_cache=True).logits
        b = model(ids[:, 15:], cache=branch, use_cache=True).logits
    assert_close(a, b, atol=0.0)


@pytest.mark.slow
def test_a_million_tokens_at_constant_memory_and_exact_numerics():
    """Stream 1,000,000 tokens; the cache keeps its size, and the next block computed from that state
    equals the same computation started at position 0 (the counters are the only difference)."""
    model = fam_model("llama", 64, 1, 4)
    gen = torch.Generator().manual_seed(0)
    cache, sizes, total = None, set(), 0
    with torch.inference_mode():
        while total < 1_000_000:
            n = min(16_384, 1_000_000 - total)
            cache = model(torch.randint(0, 101, (1, n), generator=gen), cache=cache, use_cache=True,
                          logits_to_keep=1).cache
            sizes.add(cache.nbytes())
            total += n
        assert cache.get_seq_length() == 1_000_000 and len(sizes) == 1
        small = copy.deepcopy(cache)
        small.seen.zero_()
        small.next_position.zero_()
        small.total_columns = 0
        nxt = random_ids(1, 100, seed=41)
        far = model(nxt, cache=cache, use_cache=True, position_ids=torch.arange(1_000_000, 1_000_100)[None]).logits
        near = model(nxt, cache=small, use_cache=True, position_ids=torch.arange(100)[None]).logits
    assert_close(far, near, atol=1e-6)
