"""`from_pretrained(DIR, device_map=...)` on a FAM checkpoint: "auto" loads (decoder layers are the model's
`_no_split_modules`), and a map that offloads a decoder layer and the head to disk (accelerate's hooks load their
weights per call, FAM's nested layer calls included) gives the logits and the greedy tokens of a plain load.
Splits over several GPUs are not checked here (no GPU)."""

from __future__ import annotations

import pytest
import torch
from client_helpers import fam_checkpoint
from transformers import AutoModelForCausalLM

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
