"""The parallel schedule computes docs/design.md §1 exactly (fp32, 1e-5), for Llama, Mistral and Gemma."""

from __future__ import annotations

import pytest
import torch
from conftest import assert_close, padding_mask, random_ids, tiny_model
from fam_reference import reference_bswa_mask_logits, reference_fam_logits

import hf_fam


def fam_model(base, C, M, F):
    return hf_fam.FAMForCausalLM.from_base_model(base, block_size=C, memory_segments=M, fam_length=F).eval()


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("C,M,N", [(32, 0, 32), (8, 3, 29), (5, 5, 30), (40, 1, 23)])
def test_no_fam_and_full_window_is_the_unmodified_model(family, attn, C, M, N):
    base = tiny_model(family, attn=attn)
    ids = random_ids(2, N)
    with torch.no_grad():
        expected = base(ids).logits
        got = fam_model(base, C, M, 0)(ids).logits
    assert_close(got, expected, msg=f"{family} C={C} M={M} N={N}")


@pytest.mark.parametrize("side", ["right", "left"])
def test_no_fam_and_full_window_with_padding_is_the_unmodified_model(family, side):
    base = tiny_model(family)
    ids = random_ids(3, 21, seed=1)
    mask = padding_mask([21, 13, 4], 21, side)
    # the unmodified model with positions counted from each row's first real token
    position_ids = (mask.cumsum(1) - 1).clamp(min=0)
    with torch.no_grad():
        expected = base(ids, attention_mask=mask, position_ids=position_ids).logits
        got = fam_model(base, 7, 2, 0)(ids, attention_mask=mask).logits
    assert_close(got, expected, mask=mask, msg=f"{family} {side} padding")


@pytest.mark.parametrize("C,M", [(4, 1), (3, 2), (5, 0), (1, 3), (6, 3)])
def test_no_fam_is_block_sliding_window_attention(family, C, M):
    base = tiny_model(family)
    ids = random_ids(3, 26, seed=2)
    mask = padding_mask([26, 19, 9], 26)
    with torch.no_grad():
        expected = reference_bswa_mask_logits(base, ids, mask, C, M)
        got = fam_model(base, C, M, 0)(ids, attention_mask=mask).logits
    assert_close(got, expected, mask=mask, msg=f"{family} BSWA C={C} M={M}")


@pytest.mark.parametrize(
    "C,M,F,N",
    [(4, 1, 2, 23), (5, 0, 3, 27), (3, 2, 1, 20), (8, 3, 4, 37), (6, 1, 6, 31), (1, 2, 2, 9), (16, 1, 4, 16)],
)
def test_fam_equals_the_plain_reference(family, C, M, F, N):
    base = tiny_model(family)
    model = fam_model(base, C, M, F)
    ids = random_ids(2, N, seed=3)
    with torch.no_grad():
        expected = reference_fam_logits(base, ids, None, C, M, F, model.fam.fam_init)
        got = model(ids).logits
    assert_close(got, expected, msg=f"{family} C={C} M={M} F={F} N={N}")


@pytest.mark.parametrize("side", ["right", "left"])
def test_fam_with_padded_batch_equals_the_reference(family, side):
    base = tiny_model(family)
    model = fam_model(base, 4, 1, 3)
    ids = random_ids(4, 25, seed=4)
    mask = padding_mask([25, 17, 8, 1], 25, side)
    with torch.no_grad():
        expected = reference_fam_logits(base, ids, mask, 4, 1, 3, model.fam.fam_init)
        got = model(ids, attention_mask=mask).logits
    assert_close(got, expected, mask=mask, msg=f"{family} {side}-padded")


def test_padded_batch_equals_rows_alone(family):
    base = tiny_model(family)
    model = fam_model(base, 4, 1, 2)
    ids = random_ids(3, 22, seed=5)
    lengths = [22, 15, 6]
    mask = padding_mask(lengths, 22)
    with torch.no_grad():
        batched = model(ids, attention_mask=mask).logits
        for b, n in enumerate(lengths):
            alone = model(ids[b : b + 1, :n]).logits
            assert_close(batched[b : b + 1, :n], alone, msg=f"row {b}")


def test_sdpa_and_eager_agree(family):
    ids = random_ids(2, 30, seed=6)
    mask = padding_mask([30, 18], 30)
    outs = []
    for attn in ("sdpa", "eager"):
        model = fam_model(tiny_model(family, attn=attn), 4, 2, 3)
        with torch.no_grad():
            outs.append(model(ids, attention_mask=mask).logits)
    assert_close(outs[0], outs[1], mask=mask, msg=f"{family} sdpa vs eager")


def test_patched_model_equals_fam_model(family):
    base = tiny_model(family)
    model = fam_model(base, 5, 1, 2)
    fam_init = model.fam.fam_init.detach().clone()
    ids = random_ids(2, 24, seed=7)
    with torch.no_grad():
        expected = model(ids).logits
        patched = hf_fam.patch(tiny_model(family), block_size=5, memory_segments=1, fam_length=2, fam_init=fam_init,
                               fam_update="paper")
        got = patched(ids).logits
    assert_close(got, expected, atol=0.0, msg="patched vs FAMForCausalLM")


def test_gemma_fam_init_is_scaled_like_token_embeddings():
    base = tiny_model("gemma")
    model = fam_model(base, 4, 1, 2)
    scale = base.model.embed_tokens.embed_scale
    assert scale.item() == pytest.approx(64**0.5)
    f0 = model.fam(1, hf_fam.modeling.fam_adapters.get_adapter("gemma").embed_scale(base.model))
    assert_close(f0[0], model.fam.fam_init * scale.to(f0.dtype), atol=0.0)


def test_labels_give_the_base_models_loss_with_full_window(family):
    base = tiny_model(family)
    ids = random_ids(2, 20, seed=8)
    with torch.no_grad():
        expected = base(ids, labels=ids).loss
        got = fam_model(base, 20, 0, 0)(ids, labels=ids).loss
    assert abs(got.item() - expected.item()) < 1e-5


def test_rows_with_their_own_position_offsets_equal_rows_alone():
    """The initial FAM is propagated once for a batch whose rows share it (`FAMChain.initial_states`); rows with
    their own position offsets (Random Position Offset) do not share it, and each equals its row alone."""
    model = fam_model(tiny_model("llama"), 4, 1, 2)
    ids = random_ids(2, 18, seed=6)
    offsets = torch.tensor([0, 300])
    with torch.no_grad():
        batched = model(ids, fam_position_offset=offsets).logits
        for b in range(2):
            alone = model(ids[b : b + 1], fam_position_offset=offsets[b : b + 1]).logits
            assert_close(batched[b : b + 1], alone, msg=f"row {b}")
        shared = model(ids, fam_position_offset=torch.tensor([300, 300])).logits
    assert not torch.allclose(batched[0], shared[0])  # the offset reaches the FAM: the check above is not vacuous
