"""LoRA through PEFT: the config helper, get_peft_model on FAM models, adapter and merged round trips."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
import torch
from conftest import assert_close, random_ids, tiny_model
from peft import AutoPeftModelForCausalLM, PeftModel, get_peft_model
from transformers import AutoModelForCausalLM

import hf_fam
from hf_fam.training import fam_lora_config, norm_module_names, unwrap_fam_model

PROJECTIONS = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}


def _fam(family="llama", kind="FAMForCausalLM", **settings):
    settings = {"block_size": 4, "memory_segments": 1, "fam_length": 3, **settings}
    if kind == "patched":
        return hf_fam.patch(tiny_model(family), **settings)
    return hf_fam.FAMForCausalLM.from_base_model(tiny_model(family), **settings)


def _train_a_little(peft_model, steps=2, seed=5):
    """A few optimizer steps so that LoRA weights and fam_init really move."""
    peft_model.train()
    opt = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=5e-2)
    for i in range(steps):
        ids = random_ids(2, 18, seed=seed + i)
        peft_model(input_ids=ids, labels=ids, use_cache=False).loss.backward()
        opt.step()
        opt.zero_grad()
    return peft_model.eval()


def test_config_defaults_follow_the_paper(family):
    model = _fam(family)
    config = fam_lora_config(model)
    assert config.r == 64 and config.lora_alpha == 64
    assert set(config.target_modules) == PROJECTIONS
    norms = norm_module_names(model, in_layers=True)  # the layers' norms: not the final norm (measured slower)
    assert config.modules_to_save == ["fam", *norms] and "norm" not in norms
    assert config.task_type == "CAUSAL_LM"
    config = fam_lora_config(model, r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"], train_fam_init=False)
    assert (config.r, config.lora_alpha, set(config.target_modules), config.modules_to_save) == (
        8, 16, {"q_proj", "v_proj"}, norms)
    assert fam_lora_config(model, train_fam_init=False, train_norms=False).modules_to_save is None
    assert fam_lora_config(model, train_norms=False).modules_to_save == ["fam"]


def test_norm_module_names_are_every_normalization_layer(family):
    model = _fam(family)
    names = norm_module_names(model)
    assert "norm" in names and "input_layernorm" in names  # every family here: the final norm, the layers' first
    found = {n.rsplit(".", 1)[-1] for n, m in model.named_modules() if "Norm" in type(m).__name__}
    assert set(names) == found
    if family == "llama":
        assert names == ["input_layernorm", "post_attention_layernorm", "norm"]
    assert norm_module_names(model, in_layers=True) == [name for name in names if name != "norm"]


def test_no_memory_module_to_save_without_memory():
    model = _fam(fam_length=0)
    assert fam_lora_config(model).modules_to_save == norm_module_names(model, in_layers=True)
    assert fam_lora_config(model, train_norms=False).modules_to_save is None


@pytest.mark.parametrize("kind", ["FAMForCausalLM", "patched"])
def test_get_peft_model_trains_lora_and_fam_init(family, kind):
    model = _fam(family, kind)
    fam_init = model.fam.fam_init.detach().clone()
    peft_model = get_peft_model(model, fam_lora_config(model, r=4))
    trainable = {n for n, p in peft_model.named_parameters() if p.requires_grad}
    assert any("fam.modules_to_save.default.fam_init" in n for n in trainable)
    adapted = {n.split(".lora_")[0].rsplit(".", 1)[-1] for n in trainable if ".lora_" in n}
    assert adapted == PROJECTIONS
    norms = set(norm_module_names(model, in_layers=True))
    saved = {n.split(".modules_to_save.")[0].rsplit(".", 1)[-1] for n in trainable if ".modules_to_save." in n}
    assert saved == {"fam"} | norms
    assert all("lora_" in n or ".modules_to_save." in n for n in trainable)
    assert unwrap_fam_model(peft_model) is model
    layer_norm = peft_model.base_model.model.model.layers[0].input_layernorm
    norm_before = layer_norm.original_module.weight.detach().clone()

    _train_a_little(peft_model)
    trained = peft_model.base_model.model.fam.modules_to_save.default.fam_init
    assert (trained - fam_init).abs().max() > 1e-3, "fam_init did not train"
    assert_close(peft_model.base_model.model.fam.original_module.fam_init, fam_init, atol=0.0)
    assert (layer_norm.modules_to_save.default.weight - norm_before).abs().max() > 1e-3, "the norms did not train"
    assert_close(layer_norm.original_module.weight, norm_before, atol=0.0)


@pytest.mark.parametrize("kind", ["FAMForCausalLM", "patched"])
def test_what_peft_wraps_outside_the_layers_runs_in_the_forward(kind):
    """PEFT puts its wrappers in place with setattr on the module's parent: for the final norm, the embeddings and
    the LM head that is the FAM model (or its backbone), not the base module whose forward runs. Every trained
    weight gets a gradient, the final norm trains (named in modules_to_save), and unmerged = merged."""
    from peft import LoraConfig

    model = _fam("llama", kind)
    base_logits_ids = random_ids(2, 18, seed=3)
    with torch.no_grad():
        base_logits = model.eval()(base_logits_ids).logits
    config = LoraConfig(r=4, target_modules=["q_proj", "lm_head"], modules_to_save=["fam", "norm", "embed_tokens"],
                        init_lora_weights=False)
    peft_model = get_peft_model(model, config).train()
    ids = random_ids(2, 18, seed=4)
    peft_model(input_ids=ids, labels=ids).loss.backward()
    missing = [n for n, p in peft_model.named_parameters() if p.requires_grad and (p.grad is None or not p.grad.any())]
    assert not missing, missing
    peft_model.zero_grad()
    _train_a_little(peft_model)
    norm = peft_model.base_model.model.get_decoder().norm
    assert (norm.modules_to_save.default.weight - norm.original_module.weight).abs().max() > 1e-3
    with torch.no_grad():
        unmerged = peft_model(input_ids=base_logits_ids).logits
        merged = peft_model.merge_and_unload().eval()(base_logits_ids).logits
    assert (unmerged - base_logits).abs().max() > 1e-2
    assert_close(merged, unmerged, atol=1e-5)


def test_adapter_round_trip_and_merge(family, tmp_path):
    base = _fam(family)
    base.save_pretrained(tmp_path / "base")
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "base")
    peft_model = _train_a_little(get_peft_model(model, fam_lora_config(model, r=4, init_lora_weights=False)))
    ids = random_ids(2, 23, seed=9)
    mask = torch.ones_like(ids)
    mask[1, :5] = 0  # left padding in row 1
    with torch.no_grad():
        expected = peft_model(input_ids=ids, attention_mask=mask).logits
        base_logits = base.eval()(ids, attention_mask=mask).logits
    assert (expected - base_logits).abs().max() > 1e-2  # the adapter matters
    peft_model.save_pretrained(tmp_path / "adapter")

    reloaded = AutoPeftModelForCausalLM.from_pretrained(tmp_path / "adapter", trust_remote_code=True).eval()
    assert isinstance(reloaded, PeftModel)
    assert_close(reloaded.base_model.model.fam.modules_to_save.default.fam_init,
                 peft_model.base_model.model.fam.modules_to_save.default.fam_init, atol=0.0, msg="fam_init")
    with torch.no_grad():
        assert_close(reloaded(input_ids=ids, attention_mask=mask).logits, expected, atol=0.0, msg="reloaded")

    merged = reloaded.merge_and_unload()
    # hf_fam's class, or (transformers 5.4, which prefers remote code when trust_remote_code=True) the checkpoint's copy
    assert type(merged).__name__ == "FAMForCausalLM" and type(merged.fam).__name__ == "FAMMemory"
    with torch.no_grad():
        assert_close(merged(ids, attention_mask=mask).logits, expected, atol=1e-5, msg="merged")
    merged.save_pretrained(tmp_path / "merged")
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    with torch.no_grad():
        assert_close(again(ids, attention_mask=mask).logits, expected, atol=1e-5, msg="merged, saved")


def test_a_pissa_start_is_saved_as_an_adapter_for_the_unchanged_base(tmp_path):
    """PiSSA moves each weight's top singular directions into LoRA and leaves the residual in the base: saved as it
    is, the adapter would apply to those changed weights only. save_adapter saves PEFT's conversion (rank and alpha
    doubled) that applies to the base as saved before; the live model and its config are left as they were."""
    from hf_fam.training.lora import PEFT_LORA_INITS, changes_base_weights, save_adapter, save_lora_start
    from hf_fam.training.options import LORA_INITS

    assert tuple(PEFT_LORA_INITS) == LORA_INITS
    base = _fam()
    base.save_pretrained(tmp_path / "base")
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "base")
    peft_model = get_peft_model(model, fam_lora_config(model, r=4, init_lora_weights=PEFT_LORA_INITS["pissa"]))
    assert changes_base_weights(peft_model)
    weight = "model.layers.0.self_attn.q_proj.weight"
    residual = dict(peft_model.base_model.model.named_parameters())[weight.replace("weight", "base_layer.weight")]
    assert (residual - dict(base.named_parameters())[weight]).abs().max() > 1e-3  # PiSSA changed the base
    with pytest.raises(ValueError, match="adapter names cannot hold a dot"):
        save_lora_start(peft_model, tmp_path / ".start")
    save_lora_start(peft_model, tmp_path / "start")
    assert peft_model.peft_config["default"].init_lora_weights == "pissa_niter_4"
    _train_a_little(peft_model)
    ids = random_ids(2, 23, seed=9)
    with torch.no_grad():
        expected = peft_model(input_ids=ids).logits
        assert (expected - base.eval()(ids).logits).abs().max() > 1e-2  # the adapter matters

    save_adapter(peft_model, tmp_path / "adapter", tmp_path / "start")
    config = peft_model.peft_config["default"]
    assert (config.r, config.lora_alpha, config.init_lora_weights) == (4, 4, "pissa_niter_4")
    with torch.no_grad():
        assert_close(peft_model(input_ids=ids).logits, expected, atol=0.0, msg="live model after saving")
    reloaded = AutoPeftModelForCausalLM.from_pretrained(tmp_path / "adapter").eval()  # on tmp_path/"base"
    assert (reloaded.peft_config["default"].r, reloaded.peft_config["default"].init_lora_weights) == (8, True)
    assert not changes_base_weights(reloaded)
    with torch.no_grad():
        assert_close(reloaded(input_ids=ids).logits, expected, atol=1e-5, msg="converted adapter on the base")
        assert_close(reloaded.merge_and_unload()(ids).logits, expected, atol=1e-5, msg="converted, merged")
    plain = get_peft_model(AutoModelForCausalLM.from_pretrained(tmp_path / "base"), fam_lora_config(model, r=4))
    assert not changes_base_weights(plain)


def test_adapter_and_merged_model_load_without_hf_fam(tmp_path):
    base = _fam("llama", block_size=5, fam_length=2)
    base.save_pretrained(tmp_path / "base")
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "base")
    peft_model = _train_a_little(get_peft_model(model, fam_lora_config(model, r=4, init_lora_weights=False)))
    peft_model.save_pretrained(tmp_path / "adapter")
    ids = random_ids(2, 27, seed=3)
    with torch.no_grad():
        expected = peft_model(input_ids=ids).logits
    torch.save({"ids": ids, "expected": expected}, tmp_path / "ref.pt")
    peft_model.merge_and_unload().save_pretrained(tmp_path / "merged")

    script = textwrap.dedent(
        f"""
        import sys
        sys.modules["hf_fam"] = None  # `import hf_fam` fails in this process
        import torch
        from peft import AutoPeftModelForCausalLM
        from transformers import AutoModelForCausalLM
        ref = torch.load({str(tmp_path / "ref.pt")!r})
        adapter = AutoPeftModelForCausalLM.from_pretrained({str(tmp_path / "adapter")!r}, trust_remote_code=True).eval()
        merged = AutoModelForCausalLM.from_pretrained({str(tmp_path / "merged")!r}, trust_remote_code=True).eval()
        assert type(merged).__module__.startswith("transformers_modules"), type(merged).__module__
        with torch.no_grad():
            print("ADAPTER", (adapter(input_ids=ref["ids"]).logits - ref["expected"]).abs().max().item())
            print("MERGED", (merged(ref["ids"]).logits - ref["expected"]).abs().max().item())
        """
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    diffs = dict(line.split() for line in result.stdout.splitlines() if line.startswith(("ADAPTER", "MERGED")))
    assert float(diffs["ADAPTER"]) == 0.0
    assert float(diffs["MERGED"]) <= 1e-5


def test_unknown_lora_target_is_named():
    model = _fam("llama")
    with pytest.raises(ValueError, match=r"LoRA target module 'qkv_proj' not found in this llama model; its linear "
                                         r"layers are named .*q_proj.*--lora-targets"):
        fam_lora_config(model, target_modules=["q_proj", "qkv_proj"])
    with pytest.raises(ValueError, match=r"LoRA target pattern 'nothing.\*' matches no module"):
        fam_lora_config(model, target_modules="nothing.*")
    with pytest.raises(ValueError, match="rank r must be a positive integer, got 0"):
        fam_lora_config(model, r=0)


def test_non_fam_model_is_refused():
    with pytest.raises(ValueError, match="expected a FAM model .* got LlamaForCausalLM; wrap it first"):
        fam_lora_config(tiny_model("llama"))


# other families: fused projections (Phi-3), eager soft-capping (Gemma 2), memory on global layers only (Gemma 3),
# a mixture of experts (Mixtral), other MLP names (StarCoder2, GLM-4, Arcee)
OTHER_FAMILIES = {
    "phi3": ("phi3", {}, "sdpa", "all"),
    "gemma2": ("gemma2", dict(sliding_window=24, layer_types=["sliding_attention", "full_attention"]), "eager", "all"),
    "gemma3-global": ("gemma3_text", dict(sliding_window=24, layer_types=["sliding_attention", "full_attention"]),
                      "sdpa", "global"),
    # experts that are not Linear modules (attention targets only); a plain MLP's own names
    "mixtral": ("mixtral", dict(num_local_experts=4, num_experts_per_tok=2), "sdpa", "all"),
    "starcoder2": ("starcoder2", {}, "sdpa", "all"),
    "glm4": ("glm4", {}, "sdpa", "all"),
    "arcee": ("arcee", {}, "sdpa", "all"),
}


@pytest.mark.parametrize("name", list(OTHER_FAMILIES))
def test_lora_and_recipe_on_other_families(name):
    from hf_fam import tiny
    from hf_fam.modeling.fam_adapters import get_adapter
    from hf_fam.training import FAMRecipeConfig, attach_recipe

    model_type, overrides, attn, fam_layers = OTHER_FAMILIES[name]
    base = tiny.tiny_model(model_type, 0, attn=attn, vocab_size=101, pad_token_id=0, bos_token_id=1, eos_token_id=2,
                           **overrides)
    model = hf_fam.FAMForCausalLM.from_base_model(base, block_size=4, memory_segments=1, fam_length=2,
                                                  fam_layers=fam_layers)
    lora = fam_lora_config(model, r=4)
    assert set(lora.target_modules) == set(get_adapter(model_type).lora_target_modules)
    peft_model = get_peft_model(model, lora)
    recipe = attach_recipe(peft_model, FAMRecipeConfig(state_passing_prob=1.0, position_offset_prob=1.0))
    _train_a_little(peft_model, steps=2)
    assert recipe.last_draw.used_saved_state
    if fam_layers == "global":
        assert recipe.saved_state[0] is None and recipe.saved_state[1].shape == (1, 2, 64)


@pytest.mark.parametrize("kind", ["FAMForCausalLM", "patched"])
def test_trained_weights_kept_in_bf16_run_with_the_model_s_dtype(kind):
    """TRL keeps a QLoRA adapter's trained weights in bf16 (fam_init and the norms among them) while the layers
    compute in fp32: the memory enters in the tokens' dtype, as if fam_init had been cast first, and its gradient
    reaches the bf16 weight."""
    torch.manual_seed(0)
    model = _fam(kind=kind, fam_update="paper")  # the update training uses (a patched model starts in "sink")
    with torch.no_grad():
        model.fam.fam_init.normal_()
        model.fam.fam_init.copy_(model.fam.fam_init.to(torch.bfloat16))  # values bf16 can hold exactly
    ids = random_ids(2, 13, seed=7)
    with torch.no_grad():
        expected = model(ids).logits
    model.fam.fam_init.data = model.fam.fam_init.data.to(torch.bfloat16)
    model.train()
    logits = model(ids).logits
    assert logits.dtype == torch.float32
    assert_close(logits, expected, atol=1e-6)
    logits.sum().backward()
    assert model.fam.fam_init.grad.dtype == torch.bfloat16 and model.fam.fam_init.grad.abs().sum() > 0


@pytest.mark.parametrize("variant", [{"use_dora": True}, {"use_rslora": True}], ids=["dora", "rslora"])
def test_lora_variants_train_and_round_trip(variant, tmp_path):
    """DoRA (a trained magnitude per output) and rsLoRA (scaling alpha / sqrt(r)) through `fam_lora_config`'s
    keywords: they change the FAM model's logits, and the saved adapter and the merged model give the same ones."""
    base = _fam()
    base.save_pretrained(tmp_path / "base")
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "base")
    config = fam_lora_config(model, r=4, init_lora_weights=False, **variant)
    peft_model = _train_a_little(get_peft_model(model, config))
    ids = random_ids(2, 23, seed=9)
    with torch.no_grad():
        expected = peft_model(input_ids=ids).logits
        assert (expected - base.eval()(ids).logits).abs().max() > 1e-2  # the adapter matters
    peft_model.save_pretrained(tmp_path / "adapter")
    reloaded = AutoPeftModelForCausalLM.from_pretrained(tmp_path / "adapter").eval()
    with torch.no_grad():
        assert_close(reloaded(input_ids=ids).logits, expected, atol=1e-5, msg="reloaded")
        assert_close(reloaded.merge_and_unload()(ids).logits, expected, atol=1e-5, msg="merged")
