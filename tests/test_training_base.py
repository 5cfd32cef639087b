"""An adapter must name a base saved as it was trained: a converted checkpoint's config.json says
fam_update "sink" (the zero-shot start), while training runs the paper's update. An adapter trained on it and
loaded on it ran without the update it was trained with, silently (the logits differed by 0.69 on a tiny model).
Training such an adapter is refused in one line; `save_training_base` saves the base to train on, and the adapter
trained there loads with its trained logits."""

from __future__ import annotations

import json
import math

import pytest
import torch
from client_helpers import fam_checkpoint
from peft import AutoPeftModelForCausalLM, LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer

from hf_fam.training import fam_lora_config, save_training_base, unwrap_fam_model


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    return fam_checkpoint(tmp_path_factory.mktemp("training_base") / "fam", route="converted")


def _ids():
    return torch.randint(3, 250, (2, 40), generator=torch.Generator().manual_seed(0))


def _train_step(model):
    model.train()
    ids = _ids()
    model(input_ids=ids, labels=ids).loss.backward()
    with torch.no_grad():
        for p in model.parameters():
            if p.grad is not None:
                p -= 0.05 * p.grad.sign()  # a step that changes every trained weight
    model.eval()


@pytest.mark.parametrize("how", ["fam_lora_config", "a LoraConfig of one's own", "paper in memory only"])
def test_training_an_adapter_of_a_zero_shot_base_is_refused_in_one_line(converted, how):
    """(TRL's SFTTrainer: tests/test_clients_trl.py.)"""
    model = AutoModelForCausalLM.from_pretrained(converted, dtype=torch.float32)
    assert json.loads((converted / "config.json").read_text())["fam_update"] == "sink"
    if how == "paper in memory only":  # what the README once advised: the base on disk still says "sink"
        model.config.fam_update = "paper"
    lora = LoraConfig(r=4, target_modules=["q_proj", "v_proj"]) if how.startswith("a LoraConfig") else \
        fam_lora_config(model, r=4)
    trained = get_peft_model(model, lora)
    trained.train()
    with pytest.raises(ValueError) as err:
        trained(input_ids=_ids(), labels=_ids())
    message = str(err.value)
    assert "\n" not in message and str(converted) in message and "fam_update='sink'" in message
    assert "hf_fam.training.save_training_base(model, DIR)" in message
    trained.eval()
    with torch.no_grad():
        trained(input_ids=_ids())  # inference is not training: it runs


def test_an_adapter_trained_on_the_saved_training_base_loads_with_its_trained_logits(converted, tmp_path):
    tokenizer = AutoTokenizer.from_pretrained(converted)
    model = AutoModelForCausalLM.from_pretrained(converted, dtype=torch.float32)
    bos_memory = model.fam.fam_init.detach().clone()
    base = save_training_base(model, tmp_path / "train-base", tokenizer)
    saved = json.loads((base / "config.json").read_text())
    assert saved["fam_update"] == "paper" and model.name_or_path == str(base)
    assert (tmp_path / "train-base" / "tokenizer.json").is_file()
    assert not torch.equal(model.fam.fam_init, bos_memory)  # content slots, as hf-fam finetune starts them

    peft_model = get_peft_model(model, fam_lora_config(model, r=4, init_lora_weights=False))
    _train_step(peft_model)
    with torch.no_grad():
        expected = peft_model(_ids()).logits
    peft_model.save_pretrained(tmp_path / "adapter")
    assert json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())["base_model_name_or_path"] == \
        str(base)
    loaded = AutoPeftModelForCausalLM.from_pretrained(tmp_path / "adapter", trust_remote_code=True).eval()
    assert unwrap_fam_model(loaded).config.fam_update == "paper"
    with torch.no_grad():
        assert (loaded(_ids()).logits - expected).abs().max() <= 1e-5

    with pytest.raises(ValueError, match="before PEFT wraps it"):
        save_training_base(peft_model, tmp_path / "again")


@pytest.mark.parametrize("how", ["from_base_model", "hf_fam.patch"])
def test_an_adapter_of_a_model_put_in_fam_mode_in_memory_needs_the_saved_training_base(converted, tmp_path, how):
    """Put in FAM mode in memory, the model's name is the plain checkpoint's: an adapter trained on it would load
    there without FAM. Refused in one line; `save_training_base` saves the FAM checkpoint the adapter then names."""
    from client_helpers import SETTINGS, base_folder

    import hf_fam

    def fam_model():
        plain = AutoModelForCausalLM.from_pretrained(base_folder(converted), dtype=torch.float32)
        if how == "hf_fam.patch":
            return hf_fam.patch(plain, **SETTINGS)
        return hf_fam.FAMForCausalLM.from_base_model(plain, **SETTINGS)

    if how == "hf_fam.patch":  # named after the plain checkpoint (from_base_model's model names none)
        trained = get_peft_model(fam_model(), fam_lora_config(fam_model(), r=4)).train()
        with pytest.raises(ValueError, match="which is not a FAM checkpoint: the adapter loaded on that base would "
                                             "run without FAM.*save_training_base"):
            trained(input_ids=_ids(), labels=_ids())

    model = fam_model()
    save_training_base(model, tmp_path / "train-base", AutoTokenizer.from_pretrained(converted))
    saved = json.loads((tmp_path / "train-base" / "config.json").read_text())
    assert saved["model_type"] == "fam" and saved["fam_update"] == "paper"
    peft_model = get_peft_model(model, fam_lora_config(model, r=4, init_lora_weights=False))
    _train_step(peft_model)
    with torch.no_grad():
        expected = peft_model(_ids()).logits
    peft_model.save_pretrained(tmp_path / "adapter")
    loaded = AutoPeftModelForCausalLM.from_pretrained(tmp_path / "adapter", trust_remote_code=True).eval()
    with torch.no_grad():
        assert (loaded(_ids()).logits - expected).abs().max() <= 1e-5


def test_saving_the_training_base_says_what_the_start_costs_plain_text(converted, tmp_path, caplog):
    """A TRL user gets no held-out or text line from hf-fam finetune: saving the training base says how the start
    reads plain text within one block against the model as given (each figure what text_check measures alone)."""
    import logging

    from hf_fam.training import text_check

    tokenizer = AutoTokenizer.from_pretrained(converted)
    model = AutoModelForCausalLM.from_pretrained(converted, dtype=torch.float32)
    ids = text_check.text_ids(tokenizer, model.fam_settings.block_size)
    given = text_check.text_loss(model, ids, "cpu")
    with caplog.at_level(logging.INFO, logger="hf_fam.training"):
        save_training_base(model, tmp_path / "train-base", tokenizer)
    start = text_check.text_loss(model, ids, "cpu")
    said = [r for r in caplog.records if "the training start reads plain text" in r.getMessage()]
    assert len(said) == 1, [r.getMessage() for r in caplog.records]
    assert f"at loss {start:.4f} where the model as given reads {given:.4f}" in said[0].getMessage()
    assert said[0].levelname == ("WARNING" if start - given > math.log(text_check.WORSE_BY) else "INFO")
