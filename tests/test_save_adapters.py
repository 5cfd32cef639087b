"""Saving a FAM model that holds PEFT adapters. Its own adapters (transformers' `add_adapter` / `load_adapter` on
the FAM model) are saved alone, as transformers does, and load back onto the FAM checkpoint. Adapters it holds
without owning them (a base given adapters before it was patched or wrapped, a PeftModel's inner model) would be
written under PEFT's module names (`q_proj.base_layer.weight`, ...), which the checkpoint then loads as missing
weights, newly initialised: `save_pretrained` refuses them in one line and writes nothing."""

from __future__ import annotations

import pytest
import torch
from client_helpers import SETTINGS, base_folder, fam_checkpoint
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM

import hf_fam
from hf_fam.training import fam_lora_config

LORA = dict(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)


@pytest.fixture(scope="module")
def fam_folder(tmp_path_factory):
    return fam_checkpoint(tmp_path_factory.mktemp("save_adapters") / "fam")


def _ids():
    return torch.randint(5, 250, (2, 3 * SETTINGS["block_size"] + 5), generator=torch.Generator().manual_seed(3))


@pytest.mark.parametrize("route", ["patched", "wrapped"])
def test_a_base_given_adapters_before_fam_is_refused_on_save(fam_folder, tmp_path, route):
    base = AutoModelForCausalLM.from_pretrained(base_folder(fam_folder))
    torch.manual_seed(0)
    base.add_adapter(LoraConfig(**LORA))
    if route == "patched":
        model = hf_fam.patch(base, **SETTINGS)
    else:
        model = hf_fam.FAMForCausalLM.from_base_model(base, **SETTINGS)
    with pytest.raises(ValueError, match=r"wrapped by PEFT adapters \(first: model\.layers\.0\.self_attn\.q_proj\)"):
        model.save_pretrained(tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_a_peft_model_s_inner_model_is_refused_on_save(fam_folder, tmp_path):
    model = AutoModelForCausalLM.from_pretrained(fam_folder)
    peft_model = get_peft_model(model, fam_lora_config(model, r=4))
    with pytest.raises(ValueError, match="merge it in first"):
        peft_model.base_model.model.save_pretrained(tmp_path / "out")
    assert not (tmp_path / "out").exists()
    merged = peft_model.merge_and_unload()  # what the message points to: the merged model saves as itself
    with torch.no_grad():
        expected = merged.eval()(_ids()).logits
    merged.save_pretrained(tmp_path / "merged")
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    with torch.no_grad():
        assert (again(_ids()).logits - expected).abs().max().item() <= 1e-5


def test_the_fam_model_s_own_adapters_save_alone_and_load_back(fam_folder, tmp_path):
    model = AutoModelForCausalLM.from_pretrained(fam_folder).eval()
    with torch.no_grad():
        plain = model(_ids()).logits
    torch.manual_seed(0)
    model.add_adapter(LoraConfig(**LORA))
    with torch.no_grad():
        expected = model(_ids()).logits
    assert (expected - plain).abs().max().item() > 1e-3  # the adapter changes the logits
    model.save_pretrained(tmp_path / "adapter")
    saved = {p.name for p in (tmp_path / "adapter").iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors"} <= saved and "model.safetensors" not in saved
    again = AutoModelForCausalLM.from_pretrained(fam_folder).eval()
    again.load_adapter(str(tmp_path / "adapter"))
    assert type(again).__name__ == "FAMForCausalLM"
    with torch.no_grad():
        assert (again(_ids()).logits - expected).abs().max().item() <= 1e-5
