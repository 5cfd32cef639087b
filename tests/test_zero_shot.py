"""The zero-shot start (fam_init "bos", fam_update "sink"), the default of hf_fam.patch and hf-fam convert, and
the attention-sink baseline it is measured against (hf_fam.evaluation.sink_baseline). The paper's computation stays
available (fam_update="paper"), pinned by test_equivalence.py and the rest of the suite."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import assert_close, padding_mask, random_ids, tiny_model
from convert_helpers import make_source
from fam_reference import reference_fam_logits
from safetensors.torch import load_file

import hf_fam
from hf_fam.checkpoint_io.convert import ConvertOptions, convert
from hf_fam.checkpoint_io.fam_init import FamInitSpec, sink_token_id
from hf_fam.evaluation.sink_baseline import sink_attention


def sink_model(base, C, M, F, fam_init=None):
    return hf_fam.FAMForCausalLM.from_base_model(base, block_size=C, memory_segments=M, fam_length=F,
                                                 fam_init=fam_init, fam_update="sink").eval()


@pytest.mark.parametrize("C,M,F,N", [(4, 1, 3, 27), (5, 0, 2, 23), (3, 2, 4, 25), (8, 1, 1, 13)])
def test_sink_mode_equals_the_reference(family, C, M, F, N):
    base = tiny_model(family)
    fam_init = torch.randn(F, base.config.hidden_size)  # distinct rows: slot 0 alone must be read
    ids = random_ids(2, N, seed=3)
    with torch.no_grad():
        got = sink_model(base, C, M, F, fam_init)(ids).logits
        expected = reference_fam_logits(base, ids, None, C, M, F, fam_init, fam_update="sink")
    assert_close(got, expected, msg=f"{family} C={C} M={M} F={F}")


@pytest.mark.parametrize("side", ["right", "left"])
def test_sink_mode_with_padding_equals_the_reference(family, side):
    base = tiny_model(family)
    fam_init = torch.randn(3, base.config.hidden_size)
    ids = random_ids(3, 22, seed=4)
    mask = padding_mask([22, 14, 5], 22, side)
    with torch.no_grad():
        got = sink_model(base, 4, 1, 3, fam_init)(ids, attention_mask=mask).logits
        expected = reference_fam_logits(base, ids, mask, 4, 1, 3, fam_init, fam_update="sink")
    assert_close(got, expected, mask=mask, msg=f"{family} {side}")


@pytest.mark.parametrize("M", [0, 1, 2])
def test_sink_mode_streams_exactly(family, M):
    C, F = 4, 3
    base = tiny_model(family)
    model = sink_model(base, C, M, F, torch.randn(F, base.config.hidden_size))
    ids = random_ids(2, 6 * C + 3, seed=5)
    with torch.no_grad():
        parallel = model(ids, use_cache=False).logits
        for chunk in (1, 5, C, 2 * C + 3):
            cache, outs = None, []
            for s in range(0, ids.shape[1], chunk):
                out = model(ids[:, s : s + chunk], cache=cache, use_cache=True)
                cache = out.cache
                outs.append(out.logits)
            assert_close(torch.cat(outs, dim=1), parallel, msg=f"{family} M={M} chunk={chunk}")


@pytest.mark.parametrize("C,M", [(4, 1), (5, 2), (16, 0)])
def test_within_the_window_the_sink_mode_is_the_base_model(family, C, M):
    base = tiny_model(family)
    ids = random_ids(2, C * (M + 1), seed=6)
    with torch.no_grad():
        expected = base(ids).logits
        got = sink_model(base, C, M, 3, torch.randn(3, base.config.hidden_size))(ids).logits
    assert_close(got, expected, msg=f"{family} C={C} M={M}")


def test_patch_defaults_to_the_zero_shot_start(family):
    base = tiny_model(family)
    token = sink_token_id(base.config)
    row = base.get_input_embeddings().weight[token].detach().clone()
    model = hf_fam.patch(base, block_size=4, memory_segments=1, fam_length=3)
    assert model.fam_settings.fam_update == "sink"
    assert torch.equal(model.fam.fam_init.detach(), row.expand(3, -1))
    assert model.to_fam_model().config.fam_update == "sink"
    ids = random_ids(1, 19, seed=7)
    with torch.no_grad():
        got = model(ids).logits
    hf_fam.unpatch(model)
    with torch.no_grad():
        expected = reference_fam_logits(model, ids, None, 4, 1, 3, row.expand(3, -1), fam_update="sink")
    assert_close(got, expected)


def test_patch_keeps_the_paper_computation_as_an_option():
    base = tiny_model("llama")
    torch.manual_seed(11)
    model = hf_fam.patch(base, block_size=4, memory_segments=1, fam_length=3, fam_init="random", fam_update="paper")
    torch.manual_seed(11)
    expected_init = torch.empty(3, base.config.hidden_size).normal_(std=base.config.initializer_range)
    assert torch.equal(model.fam.fam_init.detach(), expected_init)
    ids = random_ids(2, 21, seed=8)
    with torch.no_grad():
        got = model(ids).logits
    hf_fam.unpatch(model)
    with torch.no_grad():
        expected = reference_fam_logits(model, ids, None, 4, 1, 3, expected_init)
    assert_close(got, expected)


def test_fam_update_is_validated_and_saved(tmp_path):
    with pytest.raises(ValueError, match="fam_update must be one of paper, sink"):
        hf_fam.patch(tiny_model("llama"), block_size=4, fam_length=2, fam_update="frozen")
    with pytest.raises(ValueError, match="fam_init must be a tensor, 'bos' or 'random'"):
        hf_fam.patch(tiny_model("llama"), block_size=4, fam_length=2, fam_init="zeros")
    model = hf_fam.patch(tiny_model("llama"), block_size=4, memory_segments=1, fam_length=2)
    model.save_pretrained(tmp_path / "ckpt")
    assert json.loads((tmp_path / "ckpt" / "config.json").read_text())["fam_update"] == "sink"
    loaded = hf_fam.FAMForCausalLM.from_pretrained(tmp_path / "ckpt").eval()
    ids = random_ids(1, 17, seed=9)
    with torch.no_grad():
        assert_close(loaded(ids).logits, model(ids).logits)


def test_convert_writes_the_zero_shot_start_by_default(tmp_path):
    src = make_source(tmp_path / "src", "llama")
    convert(src, tmp_path / "out", ConvertOptions(block_size=4, memory_segments=1, fam_length=3,
                                                                progress=False))
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["fam_update"] == "sink"
    base_weights = load_file(str(src / "model.safetensors"))
    token = config["base_config"]["bos_token_id"]
    fam_init = load_file(str(tmp_path / "out" / "model.safetensors"))["fam.fam_init"]
    assert torch.equal(fam_init, base_weights["model.embed_tokens.weight"][token].expand(3, -1))
    convert(src, tmp_path / "paper", ConvertOptions(block_size=4, memory_segments=1, fam_length=3,
                                                                  fam_init="random", fam_update="paper",
                                                                  progress=False))
    assert json.loads((tmp_path / "paper" / "config.json").read_text())["fam_update"] == "paper"


def test_bos_spec():
    assert FamInitSpec.parse("bos").kind == "bos"
    with pytest.raises(ValueError, match="expected 'bos', 'random'"):
        FamInitSpec.parse("bos:x")


# --- the attention-sink baseline --------------------------------------------------------------------------
def _assert_sinks_within_the_window_are_the_base_model(base, C, M, N, msg=""):
    ids = random_ids(2, N, seed=12)
    with torch.no_grad():
        expected = base(ids).logits
        with sink_attention(base, block_size=C, memory_segments=M, sinks=2) as run:
            got = run(ids).logits
    assert_close(got, expected, msg=msg)


@pytest.mark.parametrize("C,M,N", [(8, 1, 16), (5, 2, 12)])
def test_sinks_within_the_window_is_the_base_model(family, C, M, N):
    base = tiny_model(family)
    _assert_sinks_within_the_window_are_the_base_model(base, C, M, N)
    assert base.config._attn_implementation == "sdpa"


@pytest.mark.parametrize("C,M,K", [(4, 1, 2), (5, 2, 4), (3, 0, 1)])
def test_sinks_equal_a_dense_mask_when_positions_do_not_matter(C, M, K):
    """With the rotary frequencies zeroed, where the sinks sit does not matter: the baseline must equal the
    unmodified model with a dense mask (block window + the first K tokens)."""
    base = tiny_model("llama", attn="eager")
    base.model.rotary_emb.inv_freq.zero_()
    N = 23
    ids = random_ids(1, N, seed=13)
    q = torch.arange(N)[:, None]
    k = torch.arange(N)[None, :]
    allowed = (k <= q) & ((k // C) >= (q // C) - M) | ((k < K) & (k <= q))
    mask = torch.zeros(1, 1, N, N).masked_fill(~allowed, torch.finfo(torch.float32).min)
    with torch.no_grad():
        expected = base(ids, attention_mask=mask).logits
        base.config._attn_implementation = "sdpa"
        with sink_attention(base, block_size=C, memory_segments=M, sinks=K) as run:
            got = run(ids).logits
    assert_close(got, expected)


@pytest.mark.parametrize("name", ["helium", "glm4", "smollm3", "exaone4", "cohere2", "olmo3", "granite"])
@pytest.mark.parametrize("C,M,N", [(8, 1, 16), (5, 2, 12)])
def test_sinks_within_the_window_is_the_base_model_in_other_families(name, C, M, N):
    """The baseline moves keys between frames with the family's rotation: interleaved pairs (Helium, GLM-4),
    none on NoPE layers (SmolLM3, EXAONE 4, Cohere 2), a rotary per layer type (OLMo 3), Granite's multipliers.
    With the half-split rotation Helium's came out 0.044 off."""
    from test_families import build

    _assert_sinks_within_the_window_are_the_base_model(build(name), C, M, N, msg=name)
