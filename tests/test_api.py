"""Public API: registration, FAMConfig validation, state-dict layout, patch() in place."""

from __future__ import annotations

import pytest
import torch
from conftest import assert_close, random_ids, tiny_config, tiny_model
from transformers import AutoConfig, AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel

import hf_fam
from hf_fam import FAMConfig, FAMForCausalLM


def test_import_registers_auto_classes():
    config = AutoConfig.for_model("fam", base_config=tiny_config("llama"), block_size=8, memory_segments=1,
                                  fam_length=2)
    assert isinstance(config, FAMConfig)
    model = AutoModelForCausalLM.from_config(config)
    assert isinstance(model, FAMForCausalLM)


def test_every_head_is_registered_mapped_and_has_a_card():
    """configuration_fam.HEADS is the one list of heads: each is registered with its Auto class, in the auto_map a
    checkpoint ships, and has a model card's pipeline tag and snippet."""
    import transformers

    from hf_fam.checkpoint_io.cards import HEAD_CARDS
    from hf_fam.modeling.configuration_fam import AUTO_MAP, HEADS

    for auto_class, (fam_class, _, _) in HEADS.items():
        assert getattr(transformers, auto_class)._model_mapping[FAMConfig].__name__ == fam_class
        assert AUTO_MAP[auto_class] == f"modeling_fam.{fam_class}" and auto_class in HEAD_CARDS
    assert set(HEAD_CARDS) == set(HEADS)


def test_config_nests_base_and_reads_through():
    config = FAMConfig(base_config=tiny_config("gemma"), block_size=16, memory_segments=2, fam_length=4)
    assert config.model_type == "fam" and config.base_config.model_type == "gemma"
    assert (config.block_size, config.memory_segments, config.fam_length) == (16, 2, 4)
    assert config.vocab_size == 101 and config.num_hidden_layers == 2
    assert config.attention_window == 48
    again = FAMConfig.from_dict(config.to_dict())
    assert again.base_config.to_dict() == config.base_config.to_dict()
    assert "_fam_delegate" not in config.to_dict()


@pytest.mark.parametrize(
    "kwargs,needle",
    [
        (dict(block_size=0), "block_size must be >= 1, got 0"),
        (dict(memory_segments=-1), "memory_segments must be >= 0, got -1"),
        (dict(fam_length=-2), "fam_length must be >= 0, got -2"),
        (dict(block_size=2.5), "block_size must be an integer"),
    ],
)
def test_config_rejects_invalid_settings(kwargs, needle):
    with pytest.raises(ValueError, match=needle):
        FAMConfig(base_config=tiny_config("llama"), **kwargs)


def test_config_rejects_unknown_family():
    with pytest.raises(ValueError, match=r"model_type 'gpt2'; supported: .*gemma.*llama.*mistral"):
        FAMConfig(base_config=GPT2Config(n_layer=1), block_size=4)


def test_state_dict_is_base_plus_one_fam_init(family):
    base = tiny_model(family)
    base_keys = set(base.state_dict())
    for model in (
        FAMForCausalLM(FAMConfig(base_config=tiny_config(family), block_size=4, memory_segments=1, fam_length=3)),
        FAMForCausalLM.from_base_model(tiny_model(family), block_size=4, memory_segments=1, fam_length=3),
        hf_fam.patch(tiny_model(family), block_size=4, memory_segments=1, fam_length=3),
    ):
        extra = set(model.state_dict()) - base_keys
        assert set(model.state_dict()) >= base_keys
        assert len(extra) == 1 and next(iter(extra)).endswith("fam_init")
        assert tuple(model.state_dict()[next(iter(extra))].shape) == (3, 64)


def test_from_config_runs(family):
    model = FAMForCausalLM(FAMConfig(base_config=tiny_config(family), block_size=4, memory_segments=1, fam_length=2))
    out = model.eval()(random_ids(2, 11))
    assert out.logits.shape == (2, 11, 101) and torch.isfinite(out.logits).all()
    assert model.fam.fam_init.abs().sum() > 0, "fam_init must be initialised, not left at zero"


def test_patch_keeps_every_module_in_place(family):
    model = tiny_model(family)
    before = dict(model.named_modules())
    patched = hf_fam.patch(model, block_size=4, memory_segments=1, fam_length=2)
    assert patched is model
    assert isinstance(model, type(tiny_model(family)))  # still a LlamaForCausalLM / ...
    after = dict(model.named_modules())
    # the decoder's place holds the FAM backbone, which wraps the original decoder stack
    assert isinstance(model.model, hf_fam.FAMModel) and model.model._fam_decoder is before["model"]
    for name, module in before.items():
        assert after[name] is module or name == "model", name
    assert set(after) - set(before) == {"fam"}
    for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
        assert isinstance(getattr(model.model.layers[0].self_attn, proj), torch.nn.Linear)


@pytest.mark.parametrize("mode", ["eval", "train"])
def test_patching_and_wrapping_keep_the_models_mode(mode):
    """A loaded model is in eval mode. Its FAM backbone once started in training mode, so a forward with gradients
    (a loss, a score) switched a zero-shot model to the paper's memory update and built no cache."""
    ids = random_ids(1, 13)
    patched = hf_fam.patch(getattr(tiny_model("llama"), mode)(), block_size=4, memory_segments=1, fam_length=2)
    wrapped = FAMForCausalLM.from_base_model(getattr(tiny_model("llama"), mode)(), block_size=4, memory_segments=1,
                                             fam_length=2, fam_update="sink")
    for model in (patched, wrapped):
        assert {m.training for m in (model, model.model, model.fam)} == {mode == "train"}
    if mode == "eval":
        for model in (patched, wrapped):
            out = model(ids)  # gradients on, as for a loss
            assert model.fam_settings.fam_update == "sink" and out.cache is not None


def test_patch_then_unpatch_restores_the_model(family):
    model = tiny_model(family)
    ids = random_ids(1, 20)
    with torch.no_grad():
        plain = model(ids).logits
        hf_fam.patch(model, block_size=4, memory_segments=0, fam_length=2)
        fam = model(ids).logits
        hf_fam.unpatch(model)
        again = model(ids).logits
    assert (fam - plain).abs().max() > 1e-3
    assert_close(again, plain, atol=0.0)
    assert not hasattr(model, "fam")


def test_patch_rejects_other_families():
    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=50))
    with pytest.raises(ValueError, match=r"model_type 'gpt2'; supported: .*gemma.*llama.*mistral.*qwen2"):
        hf_fam.patch(model, block_size=4)


def test_patch_validates_settings():
    with pytest.raises(ValueError, match="memory_segments must be >= 0"):
        hf_fam.patch(tiny_model("llama"), block_size=4, memory_segments=-1)
    with pytest.raises(ValueError, match=r"fam_init must have shape \(2, 64\)"):
        hf_fam.patch(tiny_model("llama"), block_size=4, fam_length=2, fam_init=torch.zeros(3, 64))


def test_attn_implementation_reset_by_user_is_routed_back_through_fam(family):
    model = FAMForCausalLM.from_base_model(tiny_model(family), block_size=4, memory_segments=0, fam_length=2).eval()
    ids = random_ids(1, 20)
    with torch.no_grad():
        first = model(ids).logits
        model.set_attn_implementation("eager")
        second = model(ids).logits
    assert model.config.base_config._attn_implementation == "fam_eager"
    assert_close(second, first)
