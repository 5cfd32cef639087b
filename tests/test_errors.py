"""Bad input gets one clear error naming the problem."""

from __future__ import annotations

import pytest
import torch
from conftest import random_ids, tiny_model

import hf_fam


@pytest.fixture
def model():
    return hf_fam.FAMForCausalLM.from_base_model(tiny_model("llama"), block_size=4, memory_segments=1,
                                                 fam_length=2).eval()


def test_empty_input(model):
    with pytest.raises(ValueError, match=r"Empty input \(shape \(1, 0\)\)"):
        model(torch.zeros(1, 0, dtype=torch.long))


def test_attention_mask_of_wrong_shape(model):
    with pytest.raises(ValueError, match=r"attention_mask has shape \(2, 7\), expected \(2, 9\)"):
        model(random_ids(2, 9), attention_mask=torch.ones(2, 7, dtype=torch.long))
    with pytest.raises(ValueError, match=r"attention_mask has shape \(1, 9\), expected \(2, 9\)"):
        model(random_ids(2, 9), attention_mask=torch.ones(1, 9, dtype=torch.long))


def test_4d_attention_mask_is_refused(model):
    with pytest.raises(ValueError, match="2D padding attention_mask"):
        model(random_ids(1, 5), attention_mask=torch.ones(1, 1, 5, 5))


def test_input_ids_must_be_2d(model):
    with pytest.raises(ValueError, match="input_ids must be 2D"):
        model(torch.zeros(5, dtype=torch.long))


def test_ids_and_embeds_together(model):
    ids = random_ids(1, 5)
    with pytest.raises(ValueError, match="exactly one of input_ids or inputs_embeds"):
        model(ids, inputs_embeds=model.get_input_embeddings()(ids))


def test_unsupported_attention_implementation(model):
    model.config.base_config._attn_implementation = "flash_attention_2"
    with pytest.raises(ValueError, match="attn_implementation 'sdpa' or 'eager'; got 'flash_attention_2'"):
        model(random_ids(1, 5))


@pytest.mark.parametrize("kind", ["from_config", "patched"])
def test_decoder_layers_alone_fail_loudly(kind):
    # a model that owns its modules (built from a config, loaded, or patched in place); one made with
    # from_base_model shares its layers with a base model that keeps running its own attention
    settings = dict(block_size=4, memory_segments=1, fam_length=2)
    if kind == "patched":
        model = hf_fam.patch(tiny_model("llama"), **settings).eval()
    else:
        model = hf_fam.FAMForCausalLM(hf_fam.FAMConfig(base_config=tiny_model("llama").config, **settings)).eval()
    hidden = torch.zeros(1, 3, 64)
    decoder = model.get_decoder()
    pe = decoder.rotary_emb(hidden, torch.arange(3)[None])
    with pytest.raises(RuntimeError, match="without FAM state"):
        decoder.layers[0](hidden, position_embeddings=pe)  # even before the first FAM forward
    model(random_ids(1, 5))
    with pytest.raises(RuntimeError, match="without FAM state"):
        decoder.layers[0](hidden, position_embeddings=pe)


def test_a_peft_model_given_for_a_base_is_refused_with_the_order_to_follow():
    """FAM wraps the base model; adapters go on the FAM model afterwards."""
    from peft import LoraConfig, get_peft_model

    peft_model = get_peft_model(tiny_model("llama"), LoraConfig(r=2, target_modules=["q_proj"]))
    settings = dict(block_size=4, memory_segments=1, fam_length=2)
    with pytest.raises(TypeError, match=r"got PeftModel: give FAM the base model, then add the adapters"):
        hf_fam.FAMForCausalLM.from_base_model(peft_model, **settings)
    with pytest.raises(TypeError, match=r"got PeftModel: patch the base model, then add the adapters"):
        hf_fam.patch(peft_model, **settings)
    with pytest.raises(TypeError, match=r"got Linear\.$"):
        hf_fam.patch(torch.nn.Linear(2, 2), **settings)
