"""`from_pretrained(DIR, device_map=...)` on a FAM checkpoint: "auto" loads (decoder layers are the model's
`_no_split_modules`), and a map that offloads a decoder layer and the head to disk (accelerate's hooks load their
weights per call, FAM's nested layer calls included) gives the logits and the greedy tokens of a plain load. A
plain base loaded with such a map, patched or wrapped by `FAMForCausalLM.from_base_model`, computes and saves as
the same model loaded whole. Splits over several GPUs are not checked here (no GPU)."""

from __future__ import annotations

import pytest
import torch
from client_helpers import SETTINGS, base_folder, fam_checkpoint
from transformers import AutoModelForCausalLM

import hf_fam

pytest.importorskip("accelerate")


@pytest.fixture(scope="module")
def loaded(tmp_path_factory):
    folder = fam_checkpoint(tmp_path_factory.mktemp("device_map") / "fam", route="converted")
    reference = AutoModelForCausalLM.from_pretrained(folder).eval()
    return folder, reference


def _ids():
    g = torch.Generator().manual_seed(4)
    return torch.randint(5, 250, (2, 50), generator=g)


def test_device_map_auto(loaded):
    folder, reference = loaded
    model = AutoModelForCausalLM.from_pretrained(folder, device_map="auto").eval()
    assert set(model._no_split_modules) == {"LlamaDecoderLayer"}
    with torch.no_grad():
        assert torch.equal(model(_ids()).logits, reference(_ids()).logits)


def test_decoder_layer_and_head_offloaded_to_disk(loaded, tmp_path):
    folder, reference = loaded
    device_map = {"model.embed_tokens": "cpu", "model.layers.0": "cpu", "model.layers.1": "disk", "model.norm": "cpu",
                  "model.rotary_emb": "cpu", "lm_head": "disk", "fam": "cpu"}
    model = AutoModelForCausalLM.from_pretrained(folder, device_map=device_map, offload_folder=str(tmp_path)).eval()
    assert model.hf_device_map["model.layers.1"] == "disk"
    assert model.model.layers[1].self_attn.q_proj.weight.device.type == "meta"  # really offloaded
    ids = _ids()
    with torch.no_grad():
        diff = (model(ids).logits - reference(ids).logits).abs().max().item()
    assert diff <= 1e-5, diff
    kwargs = dict(max_new_tokens=6, min_new_tokens=6, do_sample=False, pad_token_id=0)
    assert torch.equal(model.generate(ids[:1, :37], **kwargs), reference.generate(ids[:1, :37], **kwargs))


OFFLOADING_MAP = {"model.embed_tokens": "cpu", "model.layers.0": "cpu", "model.layers.1": "disk", "model.norm": "cpu",
                  "model.rotary_emb": "cpu", "lm_head": "disk"}


@pytest.mark.parametrize("route", ["patched", "wrapped"])
def test_a_base_loaded_with_an_offloading_map_runs_and_saves_fam(loaded, tmp_path, route):
    """The wrapper (`from_base_model`, and `save_pretrained` of a patched model, which goes through it) carries
    the base's `hf_device_map`: without it `save_pretrained` wrote the offloaded weights as meta tensors and
    failed ("Cannot copy out of meta tensor")."""
    folder, _ = loaded
    settings = dict(SETTINGS, fam_update="paper")

    def fam(base):
        init = torch.randn(SETTINGS["fam_length"], base.config.hidden_size, generator=torch.Generator().manual_seed(1))
        if route == "patched":
            return hf_fam.patch(base, **settings, fam_init=init)
        return hf_fam.FAMForCausalLM.from_base_model(base, **settings, fam_init=init)

    whole = fam(AutoModelForCausalLM.from_pretrained(base_folder(folder))).eval()
    base = AutoModelForCausalLM.from_pretrained(base_folder(folder), device_map=OFFLOADING_MAP,
                                                offload_folder=str(tmp_path / "offload"))
    assert base.model.layers[1].self_attn.q_proj.weight.device.type == "meta"  # really offloaded
    model = fam(base).eval()
    ids = _ids()
    with torch.no_grad():
        expected = whole(ids).logits
        assert (model(ids).logits - expected).abs().max().item() <= 1e-5
        model.save_pretrained(tmp_path / "saved")
        again = AutoModelForCausalLM.from_pretrained(tmp_path / "saved").eval()
        assert type(again).__name__ == "FAMForCausalLM"
        assert (again(ids).logits - expected).abs().max().item() <= 1e-5
