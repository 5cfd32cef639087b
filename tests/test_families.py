"""More families: Gemma 2/3, Qwen 2/3, Phi-3, Ministral, Mixtral, Qwen 2/3 MoE, GPT-OSS, OLMo 2/3, OLMoE,
Granite, SmolLM3, EXAONE 4, StarCoder2, Helium, GLM-4, Cohere 1/2, ERNIE 4.5, Seed-OSS, Arcee, Apertus,
Hunyuan, Llama 3.x rope scaling, tied and untied embeddings.

Each runs the suite Llama runs: F = 0 with a large window is the unmodified model (for families with
their own sliding-window layers: as long as the input fits that window, the right statement there), BSWA
equals a mask reference, FAM equals the plain layer-level reference, the three schedules agree, and a
saved checkpoint loads with trust_remote_code where hf_fam cannot be imported.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
import torch
import transformers
from conftest import assert_close, padding_mask, random_ids
from fam_reference import reference_bswa_mask_logits

import hf_fam
from hf_fam.testing.fam_layer_reference import reference_layer_fam_logits
from hf_fam.tiny import tiny_config, tiny_model

# hf_fam.tiny's sizes, with the tests' vocabulary and special tokens
BASE = dict(vocab_size=101, max_position_embeddings=512, pad_token_id=0, bos_token_id=1, eos_token_id=2)

# name -> (model_type, config overrides, attention implementation)
SPECS = {
    "gemma2": ("gemma2", dict(sliding_window=24, layer_types=["sliding_attention", "full_attention"],
                              attn_logit_softcapping=30.0, final_logit_softcapping=20.0), "eager"),
    "gemma3": ("gemma3_text", dict(sliding_window=24, layer_types=["sliding_attention", "full_attention"]), "sdpa"),
    "qwen2": ("qwen2", dict(use_sliding_window=True, sliding_window=24, max_window_layers=1), "sdpa"),
    "qwen3": ("qwen3", dict(), "sdpa"),
    "phi3": ("phi3", dict(rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                           "partial_rotary_factor": 0.5}),
             "sdpa"),
    "llama3-rope": ("llama", dict(rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
                                                   "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                                   "original_max_position_embeddings": 32}), "sdpa"),
    "ministral": ("ministral", dict(sliding_window=24, layer_types=["sliding_attention", "full_attention"]), "sdpa"),
    "mixtral": ("mixtral", dict(num_local_experts=4, num_experts_per_tok=2), "sdpa"),
    "qwen3_moe": ("qwen3_moe", dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32), "sdpa"),
    "olmo2": ("olmo2", dict(), "sdpa"),
    "olmo3": ("olmo3", dict(sliding_window=24, layer_types=["sliding_attention", "full_attention"]), "sdpa"),
    "granite": ("granite", dict(embedding_multiplier=3.0, residual_multiplier=0.5, attention_multiplier=0.2,
                                logits_scaling=4.0), "sdpa"),
    "smollm3": ("smollm3", dict(no_rope_layers=[1, 0]), "sdpa"),
    "exaone4": ("exaone4", dict(sliding_window=24, layer_types=["sliding_attention", "full_attention"]), "sdpa"),
    "starcoder2": ("starcoder2", dict(), "sdpa"),
    "helium": ("helium", dict(), "sdpa"),
    "glm4": ("glm4", dict(rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                           "partial_rotary_factor": 0.5}), "sdpa"),
    "cohere": ("cohere", dict(logit_scale=0.5, use_qk_norm=True), "sdpa"),
    "gpt_oss": ("gpt_oss", dict(num_local_experts=4, num_experts_per_tok=2, sliding_window=24,
                                layer_types=["sliding_attention", "full_attention"]), "eager"),
    "cohere2": ("cohere2", dict(logit_scale=0.5, sliding_window=24,
                                layer_types=["sliding_attention", "full_attention"]), "sdpa"),
    "qwen2_moe": ("qwen2_moe", dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
                                    shared_expert_intermediate_size=32), "sdpa"),
    "olmoe": ("olmoe", dict(num_experts=4, num_experts_per_tok=2), "sdpa"),
    "ernie4_5": ("ernie4_5", dict(), "sdpa"),
    "seed_oss": ("seed_oss", dict(attention_dropout=0.0, residual_dropout=0.0), "sdpa"),  # its default: 0.1
    "arcee": ("arcee", dict(), "sdpa"),
    "apertus": ("apertus", dict(), "sdpa"),
    "hunyuan_v1_dense": ("hunyuan_v1_dense", dict(), "sdpa"),
    "llama-tied": ("llama", dict(tie_word_embeddings=True), "sdpa"),
    "llama-untied": ("llama", dict(tie_word_embeddings=False), "sdpa"),
}
INTERLEAVED = ("gemma2", "gemma3", "qwen2", "ministral", "olmo3", "exaone4", "gpt_oss", "cohere2")


def _config_error(name: str) -> str | None:
    """Why the installed transformers cannot build this family's config, or None (transformers 5.4.0 mistypes a
    field of OLMo 2/3's, OLMoE's, ERNIE 4.5's and Cohere 2's configs and refuses every config of theirs: the
    family is unusable there, with or without FAM)."""
    model_type, overrides, _ = SPECS[name]
    try:
        tiny_config(model_type, **{**BASE, **overrides})
    except Exception as err:  # huggingface_hub's StrictDataclassFieldValidationError, among others
        return f"transformers {transformers.__version__} cannot build a {model_type} config: {str(err).splitlines()[0]}"
    return None


# the families the installed transformers can build (the tests that loop over families use these)
BUILDABLE = [name for name in SPECS if _config_error(name) is None]


def test_only_transformers_5_4_skips_families():
    """The families skipped for a config transformers cannot build are 5.4.0's known ones, and none from 5.5 on:
    a mistake in SPECS would otherwise skip a family's tests silently on every release."""
    from hf_fam.modeling.fam_compat import _minor

    skipped = {SPECS[name][0] for name in SPECS if name not in BUILDABLE}
    if _minor(transformers.__version__) >= (5, 5):
        assert not skipped, {name: _config_error(name) for name in SPECS if name not in BUILDABLE}
    else:
        assert skipped <= {"olmo2", "olmo3", "olmoe", "ernie4_5", "cohere2"}, skipped


def build(name: str, seed: int = 0):
    if name not in BUILDABLE:
        pytest.skip(_config_error(name))
    model_type, overrides, attn = SPECS[name]
    # sharper attention, so that masks visibly matter
    return tiny_model(model_type, seed, attn=attn, sharpen=3.0, **{**BASE, **overrides}).eval()


def fam(base, C, M, F, fam_layers="all"):
    return hf_fam.FAMForCausalLM.from_base_model(base, block_size=C, memory_segments=M, fam_length=F,
                                                 fam_layers=fam_layers).eval()


@pytest.fixture(params=list(SPECS))
def spec(request):
    return request.param


def test_full_window_without_fam_is_the_unmodified_model(spec):
    base = build(spec)
    ids = random_ids(2, 22, seed=1)  # fits the families' own sliding windows (24)
    mask = padding_mask([22, 13], 22)
    with torch.no_grad():
        expected = base(ids, attention_mask=mask).logits
        got = fam(base, 8, 2, 0)(ids, attention_mask=mask).logits
    assert_close(got, expected, mask=mask, msg=spec)


def test_no_fam_is_block_sliding_window_attention(spec):
    base = build(spec)
    ids = random_ids(2, 27, seed=2)
    mask = padding_mask([27, 16], 27, "left")
    with torch.no_grad():
        expected = reference_bswa_mask_logits(base, ids, mask, 4, 1)
        got = fam(base, 4, 1, 0)(ids, attention_mask=mask).logits
    assert_close(got, expected, mask=mask, msg=spec)


@pytest.mark.parametrize("C,M,F", [(4, 1, 3), (5, 0, 2), (3, 2, 1)])
def test_fam_equals_the_layer_reference(spec, C, M, F):
    base = build(spec)
    model = fam(base, C, M, F)
    ids = random_ids(2, 23, seed=3)
    mask = padding_mask([23, 15], 23)
    with torch.no_grad():
        expected = reference_layer_fam_logits(base, ids, mask, C, M, F, model.fam.fam_init)
        got = model(ids, attention_mask=mask).logits
    assert_close(got, expected, mask=mask, msg=f"{spec} C={C} M={M} F={F}")


@pytest.mark.parametrize("name", INTERLEAVED)
def test_fam_on_global_layers_only(name):
    base = build(name)
    model = fam(base, 4, 1, 3, fam_layers="global")
    ids = random_ids(2, 23, seed=4)
    with torch.no_grad():
        expected = reference_layer_fam_logits(base, ids, None, 4, 1, 3, model.fam.fam_init, fam_layers="global")
        got = model(ids).logits
        everywhere = fam(base, 4, 1, 3)(ids).logits
    assert_close(got, expected, msg=name)
    assert (got - everywhere).abs().max() > 1e-4  # the choice matters


@pytest.mark.parametrize("name", INTERLEAVED)
def test_fam_on_global_layers_only_decodes_token_by_token(name):
    # layers with and without FAM keep windows of two layouts; a decoding step builds its write index and
    # mask once per layout and forward
    model = fam(build(name), 4, 1, 3, fam_layers="global")
    ids = random_ids(2, 15, seed=6)
    mask = padding_mask([15, 12], 15, "left")
    with torch.no_grad():
        parallel = model(ids, attention_mask=mask).logits
        cache, outs = None, []
        for s in range(ids.shape[1]):
            out = model(ids[:, s : s + 1], attention_mask=mask[:, : s + 1], cache=cache, use_cache=True)
            cache = out.cache
            outs.append(out.logits)
    assert_close(torch.cat(outs, dim=1), parallel, mask=mask, msg=name)


def test_fam_layers_global_needs_a_global_layer():
    base = build("qwen3")  # no sliding layers at all: every layer is global, fine
    fam(base, 4, 1, 2, fam_layers="global")(random_ids(1, 9))
    mistral = tiny_model("mistral", **{**BASE, "sliding_window": 16}).eval()
    with pytest.raises(ValueError, match="no global"):
        fam(mistral, 4, 1, 2, fam_layers="global")(random_ids(1, 9))
    with pytest.raises(ValueError, match="fam_layers must be one of all, global"):
        fam(base, 4, 1, 2, fam_layers="local")


def test_three_schedules_agree(spec):
    C = 4
    model = fam(build(spec), C, 1, 2)
    ids = random_ids(2, 6 * C + 1, seed=5)
    with torch.no_grad():
        parallel = model(ids, use_cache=False).logits
        for chunk in (1, 7, C):
            cache, outs = None, []
            for s in range(0, ids.shape[1], chunk):
                out = model(ids[:, s : s + chunk], cache=cache, use_cache=True)
                cache, outs = out.cache, outs + [out.logits]
            assert_close(torch.cat(outs, 1), parallel, atol=1e-5, msg=f"{spec} chunk={chunk}")
    cached = model.generate(ids[:1, :6], max_new_tokens=12, do_sample=False)
    uncached = model.generate(ids[:1, :6], max_new_tokens=12, do_sample=False, use_cache=False)
    assert torch.equal(cached, uncached)


@pytest.mark.parametrize("name", ["smollm3", "exaone4", "cohere2"])
def test_nope_layers_rotate_by_zero_frequencies_kept_across_calls(name):
    """A NoPE layer's frequencies are zeros (keys move between frames unchanged), the same tensor on every call:
    the block attention caches its rotations by the frequencies' identity, which a fresh tensor per call (freed,
    its id reused) would make unreliable."""
    from hf_fam.modeling.fam_adapters import get_adapter

    base = build(name)
    adapter, decoder = get_adapter(SPECS[name][0]), base.model
    nope = [i for i in range(base.config.num_hidden_layers) if not adapter.uses_rope(decoder, i)]
    rope = [i for i in range(base.config.num_hidden_layers) if adapter.uses_rope(decoder, i)]
    assert nope == [1] and rope == [0]
    freq = adapter.inv_freq(decoder, 1)
    assert freq is adapter.inv_freq(decoder, 1) and not freq.any()
    assert adapter.inv_freq(decoder, 0).any()


@pytest.mark.parametrize("name", ["mixtral", "qwen3_moe", "gpt_oss", "qwen2_moe", "olmoe"])
def test_router_logits_and_auxiliary_loss_come_from_the_block_tokens(name):
    """A mixture of experts' router logits (one per layer, one row per token of the input) and its auxiliary
    loss: with no memory and a window holding the input, those of the unmodified model; with the memory, the
    memory's own steps through the experts add no rows."""
    base = build(name)
    ids = random_ids(2, 15, seed=6)
    with torch.no_grad():
        expected = base(ids, labels=ids, output_router_logits=True)
        same = fam(base, 8, 2, 0)(ids, labels=ids, output_router_logits=True)
        with_memory = fam(base, 4, 1, 2)(ids, labels=ids, output_router_logits=True)
    assert_close(same.aux_loss, expected.aux_loss, msg="aux_loss")
    for got, want in zip(same.router_logits, expected.router_logits, strict=True):
        assert_close(got, want, msg="router logits")
    assert [t.shape for t in with_memory.router_logits] == [t.shape for t in expected.router_logits]
    assert torch.isfinite(with_memory.aux_loss) and (with_memory.aux_loss - expected.aux_loss).abs() > 1e-4


def test_tied_and_untied_embeddings_survive_save_and_load(tmp_path):
    for name in ("llama-tied", "llama-untied"):
        model = fam(build(name), 4, 1, 2)
        model.save_pretrained(tmp_path / name)
        loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / name).eval()
        tied = loaded.lm_head.weight.data_ptr() == loaded.model.embed_tokens.weight.data_ptr()
        assert tied == (name == "llama-tied")
        ids = random_ids(1, 13)
        with torch.no_grad():
            assert_close(loaded(ids).logits, model(ids).logits, atol=0.0)


def test_every_family_loads_with_remote_code_without_hf_fam(tmp_path):
    expected = {}
    for name in BUILDABLE:
        model = fam(build(name), 4, 1, 2)
        ids = random_ids(1, 15, seed=6)
        with torch.no_grad():
            expected[name] = (ids, model(ids).logits)
        model.save_pretrained(tmp_path / name)
    torch.save(expected, tmp_path / "expected.pt")
    script = textwrap.dedent(
        f"""
        import sys
        sys.modules["hf_fam"] = None
        import torch
        from transformers import AutoModelForCausalLM
        expected = torch.load({str(tmp_path / "expected.pt")!r})
        for name, (ids, logits) in expected.items():
            model = AutoModelForCausalLM.from_pretrained({str(tmp_path)!r} + "/" + name, trust_remote_code=True).eval()
            with torch.no_grad():
                diff = (model(ids).logits - logits).abs().max().item()
            print(name, diff)
            assert diff == 0.0, (name, diff)
        """
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=tmp_path, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert len(result.stdout.strip().splitlines()) == len(BUILDABLE)


def test_every_family_converts_and_matches_patch(tmp_path):
    """`convert` on a saved base checkpoint of each family; the result, loaded where hf_fam cannot be
    imported, gives the logits of `hf_fam.patch` on the base model with the same fam_init (Mixtral and Qwen 3
    MoE, whose checkpoints store each expert apart, are loaded whole by transformers instead of streamed)."""
    from convert_helpers import run_without_hf_fam
    from safetensors.torch import load_file

    from hf_fam.checkpoint_io.convert import ConvertOptions, convert

    expected = {}
    for name in BUILDABLE:
        base = build(name)
        src, out = tmp_path / f"{name}-src", tmp_path / f"{name}-fam"
        base.save_pretrained(src)
        settings = dict(block_size=4, memory_segments=1, fam_length=2)
        convert(src, out, ConvertOptions(**settings, progress=False))
        fam_init = load_file(out / "model.safetensors")["fam.fam_init"]
        patched = hf_fam.patch(transformers.AutoModelForCausalLM.from_pretrained(src).eval(), **settings,
                               fam_init=fam_init)
        ids = random_ids(1, 17, seed=7)
        with torch.no_grad():
            expected[name] = (ids, patched(ids).logits)
    torch.save(expected, tmp_path / "expected.pt")
    script = f"""
        import torch
        from transformers import AutoModelForCausalLM
        for name, (ids, logits) in torch.load({str(tmp_path / "expected.pt")!r}).items():
            model = AutoModelForCausalLM.from_pretrained({str(tmp_path)!r} + "/" + name + "-fam",
                                                         trust_remote_code=True)
            with torch.no_grad():
                print("DIFF", name, (model.eval()(ids).logits - logits).abs().max().item())
    """
    result = run_without_hf_fam(script, tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    diffs = {line.split()[1]: float(line.split()[2]) for line in result.stdout.splitlines() if line.startswith("DIFF")}
    assert set(diffs) == set(BUILDABLE) and max(diffs.values()) <= 1e-5, diffs
