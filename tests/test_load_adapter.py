"""`hf-fam generate` and `hf-fam eval` take a LoRA adapter of a FAM checkpoint (`hf-fam finetune`'s output, or its
Hub repo), merged into its base: the logits are the adapter's; other commands, and an adapter whose base is not a
FAM checkpoint, are refused in one line."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from client_helpers import base_folder, fam_checkpoint, trained_lora
from hub_helpers import FakeHub, hub_cache
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer

from hf_fam.checkpoint_io.publish import push_to_hub
from hf_fam.cli import main
from hf_fam.runtime.loading import load_fam_model


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return fam_checkpoint(tmp_path_factory.mktemp("load_adapter") / "tiny-fam", route="converted")


@pytest.fixture(scope="module")
def adapter(base):
    """An adapter folder with the tokenizer, naming its local base; and its PeftModel."""
    model = trained_lora(base, task_type="CAUSAL_LM")
    folder = base.parent / "tiny-fam-lora"
    model.save_pretrained(folder)
    AutoTokenizer.from_pretrained(base).save_pretrained(folder)
    return folder, model


def _ids():
    return torch.randint(3, 250, (1, 41), generator=torch.Generator().manual_seed(0))


def test_an_adapter_folder_loads_merged_into_its_base_with_the_adapter_s_logits(adapter):
    folder, peft_model = adapter
    model, tokenizer = load_fam_model(str(folder), adapters=True)
    assert type(model).__name__ == "FAMForCausalLM" and not hasattr(model, "peft_config")  # merged
    assert tokenizer is not None
    ids = _ids()
    with torch.no_grad():
        diff = (model(ids).logits - peft_model(ids).logits).abs().max().item()
    assert diff <= 1e-5, diff


def test_what_is_not_an_adapter_of_a_fam_checkpoint_is_refused_in_one_line(base, adapter, tmp_path, capsys):
    folder, _ = adapter
    with pytest.raises(ValueError, match="is a LoRA adapter, not a checkpoint; pass the checkpoint it applies to"):
        load_fam_model(str(folder))  # a caller that takes checkpoints only (hf-fam finetune)
    # an adapter of the plain model the FAM checkpoint was converted from: no FAM settings to load it with
    plain = get_peft_model(AutoModelForCausalLM.from_pretrained(base_folder(base)),
                           LoraConfig(r=2, target_modules=["q_proj"], task_type="CAUSAL_LM"))
    plain.save_pretrained(tmp_path / "plain-lora")
    assert main(["generate", str(tmp_path / "plain-lora"), "--prompt", "hello"]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]  # after the progress bars of loading
    assert err.startswith("hf-fam generate: error:") and "is not a FAM checkpoint" in err


def test_generate_and_eval_take_an_adapter_folder_and_its_hub_repo(base, adapter, tmp_path, capsys, monkeypatch):
    folder, _ = adapter
    reference = tmp_path / "merged"
    load_fam_model(str(folder), adapters=True)[0].save_pretrained(reference)
    AutoTokenizer.from_pretrained(folder).save_pretrained(reference)
    text = tmp_path / "text.txt"
    text.write_text("a feedback attention memory reads long input block by block. " * 4)
    outputs = {}
    for name, source in (("adapter", folder), ("merged", reference)):
        assert main(["eval", str(source), "--task", "perplexity", "--text-file", str(text),
                     "--out", str(tmp_path / f"{name}.json")]) == 0
        outputs[name] = json.loads((tmp_path / f"{name}.json").read_text())["perplexity"]
        capsys.readouterr()
        assert main(["generate", str(source), "--prompt", "the quick brown fox", "--max-new-tokens", "6"]) == 0
        outputs[f"{name} text"] = capsys.readouterr().out
    assert abs(outputs["adapter"] - outputs["merged"]) <= 1e-5 * outputs["merged"]
    assert outputs["adapter text"] == outputs["merged text"]
    assert main(["generate", str(base), "--prompt", "the quick brown fox", "--max-new-tokens", "6"]) == 0
    assert capsys.readouterr().out != outputs["merged text"]  # the base alone says otherwise

    # by its Hub repo id, offline, from the cache a download would have left
    hub = FakeHub(tmp_path / "hub")
    push_to_hub(base, "me/tiny-fam", api=hub)
    push_to_hub(folder, "me/tiny-fam-lora", base_model="me/tiny-fam", api=hub)
    cache = hub_cache(hub, tmp_path / "cache")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(cache)}
    result = subprocess.run([sys.executable, "-m", "hf_fam.cli", "generate", "me/tiny-fam-lora", "--prompt",
                             "the quick brown fox", "--max-new-tokens", "6"], capture_output=True, text=True,
                            env=env, cwd=tmp_path, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout == outputs["merged text"]


def test_eval_no_fam_refuses_what_loads_as_a_fam_model(base, adapter, tmp_path, capsys):
    """--no-fam reads a base checkpoint as is: a FAM checkpoint, or an adapter of one, would run FAM under its
    no-FAM label."""
    folder, _ = adapter
    text = tmp_path / "text.txt"
    text.write_text("a feedback attention memory reads long input block by block. " * 2)
    from hf_fam.modeling.fam_compat import ADAPTER_MODULES_TO_SAVE_LOADED

    for source in (base, folder):
        capsys.readouterr()
        assert main(["eval", str(source), "--no-fam", "--task", "perplexity", "--text-file", str(text),
                     "--out", str(tmp_path / "x.json")]) == 2
        err = capsys.readouterr().err.strip().splitlines()[-1]
        if source == folder and not ADAPTER_MODULES_TO_SAVE_LOADED:  # transformers < 5.18: refused before that
            assert "loads a PEFT adapter without the weights of its modules_to_save" in err, err
        else:
            assert "--no-fam reads a base checkpoint as is" in err, err
    assert not (tmp_path / "x.json").exists()
    assert main(["eval", str(base_folder(base)), "--no-fam", "--task", "perplexity", "--text-file", str(text),
                 "--out", str(tmp_path / "plain.json")]) == 0  # a base checkpoint as is
