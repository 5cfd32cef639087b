"""transformers before 5.18 load a PEFT adapter through `from_pretrained(ADAPTER)` / `model.load_adapter` without the
weights of its modules_to_save (a FAM adapter's `fam_init` and norms, a classifier's `score`), plain models too: the
model would run silently without what the adapter trained there. A FAM model (converted or patched) refuses such a
load in one line and keeps no half-loaded adapter; where transformers loads them, the adapter's logits come back."""

from __future__ import annotations

import pytest
import torch
from client_helpers import base_folder, fam_checkpoint, trained_lora
from conftest import assert_close, random_ids
from transformers import AutoModelForCausalLM

import hf_fam
from hf_fam.modeling import fam_compat


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A FAM checkpoint, an adapter of it with `fam` in modules_to_save, and the adapter's logits."""
    root = tmp_path_factory.mktemp("mts")
    base = fam_checkpoint(root / "fam")
    peft_model = trained_lora(base)
    peft_model.save_pretrained(root / "adapter")
    ids = random_ids(1, 37, seed=4, vocab=250)
    with torch.no_grad():
        expected = peft_model(ids).logits
    return base, root / "adapter", ids, expected


def test_from_pretrained_of_an_adapter_gives_its_logits_or_refuses(saved):
    base, adapter, ids, expected = saved
    if fam_compat.ADAPTER_MODULES_TO_SAVE_LOADED:
        model = AutoModelForCausalLM.from_pretrained(adapter).eval()
        with torch.no_grad():
            assert_close(model(ids).logits, expected, msg="from_pretrained(adapter)")
    else:
        with pytest.raises(ValueError, match="without the weights of its modules_to_save") as info:
            AutoModelForCausalLM.from_pretrained(adapter)
        assert "\n" not in str(info.value) and "5.18" in str(info.value)


@pytest.mark.parametrize("kind", ["FAMForCausalLM", "patched"])
def test_a_load_that_would_leave_out_modules_to_save_is_refused_and_undone(saved, monkeypatch, kind):
    base, adapter, ids, _ = saved
    monkeypatch.setattr(fam_compat, "ADAPTER_MODULES_TO_SAVE_LOADED", False)  # as on transformers 5.4 to 5.17
    if kind == "patched":
        model = hf_fam.patch(AutoModelForCausalLM.from_pretrained(base_folder(base)).eval(), block_size=8,
                             memory_segments=1, fam_length=4, fam_update="paper", fam_init="random")
    else:
        model = AutoModelForCausalLM.from_pretrained(base).eval()
    with torch.no_grad():
        before = model(ids).logits
    with pytest.raises(ValueError, match=r"modules_to_save \(fam\)"):
        model.load_adapter(str(adapter))
    assert not (getattr(model, "peft_config", None) or {})  # nothing half-loaded left behind
    with torch.no_grad():
        assert_close(model(ids).logits, before, atol=0.0, msg="the model as before")


def test_an_adapter_without_modules_to_save_still_loads(tmp_path, monkeypatch):
    from peft import LoraConfig, get_peft_model

    monkeypatch.setattr(fam_compat, "ADAPTER_MODULES_TO_SAVE_LOADED", False)
    base = fam_checkpoint(tmp_path / "fam")
    peft_model = get_peft_model(AutoModelForCausalLM.from_pretrained(base),
                                LoraConfig(r=4, target_modules=["q_proj"], init_lora_weights=False)).eval()
    peft_model.save_pretrained(tmp_path / "adapter")
    ids = random_ids(1, 21, seed=5, vocab=250)
    model = AutoModelForCausalLM.from_pretrained(base).eval()
    model.load_adapter(str(tmp_path / "adapter"))
    with torch.no_grad():
        assert_close(model(ids).logits, peft_model(ids).logits, msg="LoRA alone loads")
