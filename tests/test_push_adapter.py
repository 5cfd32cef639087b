"""Sharing a LoRA adapter of a FAM checkpoint: `push_to_hub(adapter_folder_or_peft_model, repo_id, base_model=...)`
and `hf-fam push ADAPTER REPO_ID --base-model BASE`.

The stand-in Hub (`hub_helpers.FakeHub`) keeps each commit; its repos are then laid out as a Hugging Face cache,
and the adapter is loaded by its repo id, offline, in a process where hf_fam cannot be imported, as a user
elsewhere would: `AutoPeftModelForCausalLM.from_pretrained(repo_id, trust_remote_code=True)` fetches the FAM base
the pushed adapter_config.json names and must give the logits of the adapter pushed.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import textwrap

import pytest
import torch
from client_helpers import fam_checkpoint, trained_lora
from convert_helpers import run_without_hf_fam, tree_hashes
from hub_helpers import hub_cache
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer

from hf_fam.checkpoint_io import publish
from hf_fam.checkpoint_io.cards import CARD_MARK
from hf_fam.checkpoint_io.publish import push_to_hub
from hf_fam.cli import main


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A converted tiny Llama with its tokenizer (the FAM base adapters are trained on)."""
    return fam_checkpoint(tmp_path_factory.mktemp("push_adapter") / "tiny-fam", route="converted")


@pytest.fixture(scope="module")
def adapter(base, tmp_path_factory):
    """An adapter folder naming its local base, with the tokenizer and PEFT's own card, as saved."""
    folder = tmp_path_factory.mktemp("adapters") / "tiny-fam-lora"
    trained_lora(base).save_pretrained(folder)
    AutoTokenizer.from_pretrained(base).save_pretrained(folder)
    assert publish.publish_adapter.PEFT_TEMPLATE_MARK in (folder / "README.md").read_text()
    return folder


def _ids(seed=0):
    return torch.randint(3, 250, (1, 37), generator=torch.Generator().manual_seed(seed))


def _adapter_logits(base_folder, adapter_folder, ids):
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_folder), adapter_folder).eval()
    with torch.no_grad():
        return model(ids).logits


def _assert_loads_by_repo_id_elsewhere(hub, repo_id, ids, expected, tmp_path, transformers_expected=None):
    """The pushed adapter, loaded by its repo id from a cache of the stand-in Hub, offline, where hf_fam cannot be
    imported: the FAM base comes as remote code, and the logits are the adapter's. `transformers_expected`: what
    transformers' own loading gives where it differs (it takes the base's newest commit, not the pinned one)."""
    cache = hub_cache(hub, tmp_path / "cache")
    torch.save({"ids": ids, "expected": expected,
                "transformers": expected if transformers_expected is None else transformers_expected},
               tmp_path / "expected.pt")
    script = f"""
        import os
        os.environ["HF_HUB_CACHE"], os.environ["HF_HUB_OFFLINE"] = {str(cache)!r}, "1"
        import torch
        from peft import AutoPeftModelForCausalLM
        from transformers import AutoTokenizer
        data = torch.load({str(tmp_path / "expected.pt")!r})
        model = AutoPeftModelForCausalLM.from_pretrained({repo_id!r}, trust_remote_code=True).eval()
        AutoTokenizer.from_pretrained({repo_id!r}, trust_remote_code=True)
        print("BASE", type(model.get_base_model()).__name__, type(model.get_base_model()).__module__)
        with torch.no_grad():
            print("DIFF", (model(data["ids"]).logits - data["expected"]).abs().max().item())
        # transformers' own PEFT integration, and so `pipeline`, loads an adapter repo as its base with the adapter
        from transformers import AutoModelForCausalLM, pipeline
        plain = AutoModelForCausalLM.from_pretrained({repo_id!r}, trust_remote_code=True).eval()
        piped = pipeline("text-generation", model={repo_id!r}, trust_remote_code=True).model.eval()
        with torch.no_grad():
            for name, loaded in (("AUTO", plain), ("PIPELINE", piped)):
                print(name, type(loaded).__name__, loaded._hf_peft_config_loaded,
                      (loaded(data["ids"]).logits - data["transformers"]).abs().max().item())
    """
    result = run_without_hf_fam(script, tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "BASE FAMForCausalLM transformers_modules." in result.stdout  # the base's own code, from its repo
    for name in ("DIFF", "AUTO FAMForCausalLM True", "PIPELINE FAMForCausalLM True"):
        diff = float(result.stdout.split(name)[1].split()[0])
        assert diff <= 1e-5, (name, diff)


def test_an_adapter_goes_up_after_its_base_naming_it_and_loads_by_repo_id_without_hf_fam(base, adapter, hub,
                                                                                         tmp_path):
    before = tree_hashes(adapter)
    with pytest.raises(ValueError, match="which others cannot load: push the base first"):
        push_to_hub(adapter, "me/tiny-fam-lora")  # it names its local base
    with pytest.raises(ValueError, match="base me/tiny-fam of .* is not on the Hub.*hf-fam push"):
        push_to_hub(adapter, "me/tiny-fam-lora", base_model="me/tiny-fam")
    assert not hub.committed()

    push_to_hub(base, "me/tiny-fam")
    push_to_hub(adapter, "tiny-fam-lora", base_model="me/tiny-fam")
    assert ("create_commit", "me/tiny-fam-lora", publish.DEFAULT_ADAPTER_COMMIT_MESSAGE, None, False) in hub.calls
    assert tree_hashes(adapter) == before  # the folder itself is never modified
    repo = hub.repo("me/tiny-fam-lora")
    assert {p.name for p in repo.iterdir()} == {p.name for p in adapter.iterdir() if p.is_file()}
    pushed_config = json.loads((repo / "adapter_config.json").read_text())
    assert pushed_config["base_model_name_or_path"] == "me/tiny-fam"
    saved_config = json.loads((adapter / "adapter_config.json").read_text())
    # made without a task type, it names hf_fam's class to import, which the loading process cannot
    assert saved_config["task_type"] is None and saved_config["auto_mapping"]["parent_library"].startswith("hf_fam")
    assert saved_config["revision"] is None and len(hub.head("me/tiny-fam")) == 40
    assert pushed_config == {**saved_config, "base_model_name_or_path": "me/tiny-fam", "task_type": "CAUSAL_LM",
                             "auto_mapping": None, "revision": hub.head("me/tiny-fam")}  # the base's commit
    assert (repo / "adapter_model.safetensors").read_bytes() == (adapter / "adapter_model.safetensors").read_bytes()
    card = (repo / "README.md").read_text()  # PEFT's template card is replaced by one for the adapter
    assert CARD_MARK in card and "base_model: me/tiny-fam" in card and "library_name: peft" in card
    assert 'model_id = "me/tiny-fam-lora"' in card and "AutoPeftModelForCausalLM" in card
    assert "base_model:adapter:me/tiny-fam" in card and "| LoRA rank r, alpha | 4, 8 |" in card
    assert f"/me/tiny-fam/tree/{hub.head('me/tiny-fam')})" in card and "does not read the pin" in card

    ids = _ids()
    _assert_loads_by_repo_id_elsewhere(hub, "me/tiny-fam-lora", ids, _adapter_logits(base, adapter, ids), tmp_path)


def test_a_peft_model_is_pushed_as_its_adapter(base, hub, tmp_path):
    push_to_hub(base, "me/tiny-fam")
    model = trained_lora(base)
    push_to_hub(model, "me/from-peft", base_model="me/tiny-fam", tokenizer=AutoTokenizer.from_pretrained(base))
    repo = hub.repo("me/from-peft")
    assert json.loads((repo / "adapter_config.json").read_text())["base_model_name_or_path"] == "me/tiny-fam"
    assert {"adapter_model.safetensors", "tokenizer.json", "README.md"} <= {p.name for p in repo.iterdir()}
    assert 'model_id = "me/from-peft"' in (repo / "README.md").read_text()
    ids = _ids(1)
    with torch.no_grad():
        expected = model(ids).logits
    _assert_loads_by_repo_id_elsewhere(hub, "me/from-peft", ids, expected, tmp_path)


@pytest.mark.parametrize("case", ["plain base", "another base", "no weights", "not a repo id", "base with checkpoint",
                                  "peft of a plain model", "other adapter type"])
def test_an_adapter_that_would_not_load_as_trained_is_refused_before_anything_is_uploaded(base, adapter, hub,
                                                                                          tmp_path, case):
    """Each of these would load elsewhere without FAM, or on another base than the one trained, or not at all."""
    folder = tmp_path / "adapter"
    shutil.copytree(adapter, folder)
    checkpoint, base_model = folder, "me/base"
    if case == "plain base":  # the model the FAM base was converted from: no FAM when loaded
        plain = base.parent / f"{base.name}-base"
        shutil.copytree(plain, hub.repo("me/base"))
        message = "is not a FAM checkpoint \\(model_type 'llama'\\)"
    elif case == "another base":  # a FAM checkpoint with other settings than the adapter's own base
        other = fam_checkpoint(tmp_path / "other", block_size=16)
        shutil.copytree(other, hub.repo("me/base"))
        message = "me/base is not the base .* was trained on.*block_size"
    elif case == "no weights":
        (folder / "adapter_model.safetensors").unlink()
        message = "no adapter_model.safetensors"
    elif case == "not a repo id":
        base_model = "./local/base"
        message = "is not a Hub repo id"
    elif case == "base with checkpoint":
        checkpoint = base
        message = "go with a LoRA adapter"
    elif case == "peft of a plain model":
        plain = AutoModelForCausalLM.from_pretrained(base.parent / f"{base.name}-base")
        checkpoint = get_peft_model(plain, LoraConfig(r=2, target_modules=["q_proj"]))
        message = "not of a FAM model"
    else:
        config = json.loads((folder / "adapter_config.json").read_text())
        (folder / "adapter_config.json").write_text(json.dumps({**config, "peft_type": "IA3"}))
        message = "holds a IA3 adapter"
    with pytest.raises(ValueError, match=message):
        push_to_hub(checkpoint, "me/refused", base_model=base_model)
    assert not hub.committed()
    assert not hub.repo("me/refused").exists()


def test_a_card_of_ones_own_goes_up_as_it_is(base, adapter, hub, tmp_path):
    folder = tmp_path / "adapter"
    shutil.copytree(adapter, folder)
    (folder / "README.md").write_text("# My adapter\n")
    push_to_hub(base, "me/tiny-fam")
    push_to_hub(folder, "me/own-card", base_model="me/tiny-fam")
    assert (hub.repo("me/own-card") / "README.md").read_text() == "# My adapter\n"


def test_cli_push_of_an_adapter(base, adapter, hub, capsys):
    assert main(["push", str(adapter), "org/lora", "--base-model", "org/base"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("hf-fam push: error:") and "not on the Hub" in err and "\n" not in err
    assert main(["push", str(base), "org/base"]) == 0
    assert main(["push", str(adapter), "org/lora", "--base-model", "org/base", "--private"]) == 0
    assert "pushed" in capsys.readouterr().out
    assert ("create_repo", "org/lora", True) in hub.calls
    assert json.loads((hub.repo("org/lora") / "adapter_config.json").read_text())["base_model_name_or_path"] == \
        "org/base"


class _NoNetwork(Exception):
    """What huggingface_hub's HTTP client raises when the Hub cannot be reached (httpx.ConnectError)."""


_NoNetwork.__module__ = "httpx"


@pytest.mark.parametrize("where", ["offline mode", "no network", "download"])
def test_no_network_is_one_line_not_a_missing_base(base, adapter, hub, monkeypatch, where):
    """Without a network huggingface_hub raises its HTTP client's error (model_info), OfflineModeIsEnabled (with
    HF_HUB_OFFLINE) or LocalEntryNotFoundError (hf_hub_download), an EntryNotFoundError: none says anything about
    the base, so none may read as "not on the Hub" or "no config.json on the Hub"."""
    from huggingface_hub.errors import LocalEntryNotFoundError, OfflineModeIsEnabled

    raised = {"offline mode": OfflineModeIsEnabled("Cannot reach https://huggingface.co/api/models/me/base: offline "
                                                   "mode is enabled"),
              "no network": _NoNetwork("[Errno -2] Name or service not known"),
              "download": LocalEntryNotFoundError("An error happened while trying to locate the file on the Hub")}

    def unreachable(*args, **kwargs):
        raise raised[where]

    push_to_hub(base, "me/base")
    monkeypatch.setattr(hub, "hf_hub_download" if where == "download" else "model_info", unreachable)
    message = {"offline mode": "offline mode is enabled", "no network": "cannot reach the Hub to push to me/lora",
               "download": "cannot reach the Hub to read the base me/base's config.json"}[where]
    with pytest.raises(ConnectionError, match=message):
        push_to_hub(adapter, "me/lora", base_model="me/base")
    assert not hub.repo("me/lora").exists()


def test_the_base_s_commit_is_pinned_so_a_base_pushed_again_does_not_change_the_adapter(base, adapter, hub,
                                                                                        tmp_path, capsys):
    """The pushed adapter_config.json names the commit of the base that was checked (PEFT's `revision`):
    `AutoPeftModelForCausalLM` and `hf-fam` load the base at it after the base's repo moves on; transformers' own
    loading takes the newest base, as the card says. --base-revision picks another commit, checked against it."""
    push_to_hub(base, "me/tiny-fam")
    first = hub.head("me/tiny-fam")
    push_to_hub(adapter, "me/tiny-fam-lora", base_model="me/tiny-fam")
    pushed = json.loads((hub.repo("me/tiny-fam-lora") / "adapter_config.json").read_text())
    assert pushed["revision"] == first
    other = fam_checkpoint(tmp_path / "retrained" / "tiny-fam", route="converted", seed=1)  # other weights
    push_to_hub(other, "me/tiny-fam")
    assert hub.head("me/tiny-fam") != first
    ids = _ids(2)
    expected = _adapter_logits(base, adapter, ids)
    _assert_loads_by_repo_id_elsewhere(hub, "me/tiny-fam-lora", ids, expected, tmp_path / "elsewhere",
                                       transformers_expected=_adapter_logits(other, adapter, ids))
    script = f"""
        import os
        os.environ["HF_HUB_CACHE"], os.environ["HF_HUB_OFFLINE"] = {str(tmp_path / "elsewhere" / "cache")!r}, "1"
        import torch
        from hf_fam.runtime.loading import load_fam_model
        model = load_fam_model("me/tiny-fam-lora", adapters=True)[0]  # what hf-fam eval / generate load
        data = torch.load({str(tmp_path / "elsewhere" / "expected.pt")!r})
        with torch.no_grad():
            print("DIFF", (model(data["ids"]).logits - data["expected"]).abs().max().item())
    """
    result = subprocess.run([sys.executable, "-c", textwrap.dedent(script)], capture_output=True, text=True,
                            cwd=tmp_path, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert float(result.stdout.split("DIFF")[1].split()[0]) <= 1e-5

    # a base whose main now has other settings: refused at main, taken at the commit the adapter was trained on
    moved = fam_checkpoint(tmp_path / "moved" / "tiny-fam", route="converted", block_size=16)
    push_to_hub(moved, "me/tiny-fam")
    with pytest.raises(ValueError, match="me/tiny-fam is not the base .*block_size.*or name the commit of it the "
                       "adapter was trained on with --base-revision"):
        push_to_hub(adapter, "me/again", base_model="me/tiny-fam")
    with pytest.raises(ValueError, match="has no revision 'v0' on the Hub: name a branch, tag or commit"):
        push_to_hub(adapter, "me/again", base_model="me/tiny-fam", base_revision="v0")
    assert main(["push", str(adapter), "me/again", "--base-model", "me/tiny-fam", "--base-revision", first]) == 0
    assert json.loads((hub.repo("me/again") / "adapter_config.json").read_text())["revision"] == first
    assert main(["push", str(base), "me/x", "--base-revision", first]) == 2
    assert "go with a LoRA adapter" in capsys.readouterr().err


def test_commands_given_an_adapter_folder_name_its_base(adapter, base, capsys):
    assert main(["inspect", str(adapter)]) == 2
    err = capsys.readouterr().err.strip()
    assert "it holds a LoRA adapter" in err and str(base) in err and "\n" not in err


def test_an_adapter_s_card_takes_evaluation_results_and_they_go_up_with_it(base, adapter, hub, tmp_path, capsys):
    """`hf-fam eval OUT` then `hf-fam card OUT --eval-results eval.json` then `hf-fam push OUT ...`: the results
    stay in the card pushed for the repo."""
    folder = tmp_path / "adapter"
    shutil.copytree(adapter, folder)
    summary = {"steps": 3, "final_loss": 0.5, "final_loss_fresh_memory": 0.25, "final_loss_passed_memory": 0.75,
               "base_model": str(base), "merged": str(tmp_path / "adapter" / "merged")}
    (folder / "train_summary.json").write_text(json.dumps(summary))  # as hf-fam finetune writes it
    (tmp_path / "corpus").mkdir()
    run_config = {"model": {"path": str(base), "dtype": "float32"}, "train": {"output_dir": str(folder)},
                  "data": {"source": "text", "text_files": [str(tmp_path / "corpus"), "someone/a-dataset"]}}
    (folder / "finetune_config.json").write_text(json.dumps(run_config))
    results = tmp_path / "eval.json"
    results.write_text(json.dumps({"results": [{"task": "passkey retrieval", "metric": "accuracy", "value": 0.75,
                                                "setting": "4x window"}]}))
    assert main(["card", str(folder), "--eval-results", str(results), "--license", "apache-2.0"]) == 0
    local = (folder / "README.md").read_text()
    assert CARD_MARK in local and "LoRA adapter" in local and f"`{base}`" in local  # the local base, by path
    assert "| passkey retrieval | passkey retrieval | 4x window | accuracy | 0.75 |" in local
    assert "license: apache-2.0" in local and "model-index" in local
    assert "final loss 0.5 (from a fresh memory 0.25, from a memory passed on 0.75)" in local

    push_to_hub(base, "me/tiny-fam")
    push_to_hub(folder, "me/evaluated", base_model="me/tiny-fam")
    pushed = (hub.repo("me/evaluated") / "README.md").read_text()
    assert 'model_id = "me/evaluated"' in pushed and "base_model: me/tiny-fam" in pushed
    assert "| passkey retrieval | passkey retrieval | 4x window | accuracy | 0.75 |" in pushed
    assert "license: apache-2.0" in pushed
    # the run's summary names the base's repo, not the local folder, and no local merged model
    assert json.loads((hub.repo("me/evaluated") / "train_summary.json").read_text()) == {
        "steps": 3, "final_loss": 0.5, "final_loss_fresh_memory": 0.25, "final_loss_passed_memory": 0.75,
        "base_model": "me/tiny-fam"}
    assert json.loads((folder / "train_summary.json").read_text()) == summary  # the folder's own is kept
    # the run's options: local paths by their last part (a Hub id as it is), nothing else changed
    assert json.loads((hub.repo("me/evaluated") / "finetune_config.json").read_text()) == {
        "model": {"path": base.name, "dtype": "float32"}, "train": {"output_dir": "adapter"},
        "data": {"source": "text", "text_files": ["corpus", "someone/a-dataset"]}}
    assert json.loads((folder / "finetune_config.json").read_text()) == run_config

    capsys.readouterr()
    assert main(["card", str(folder), "--fine-tuned"]) == 2
    assert "--fine-tuned is for a checkpoint's card" in capsys.readouterr().err


CLASSIFIERS = {  # head -> the pipeline (its task, the card's tag) and a number of labels unlike the base's two
    "Sequence": ("text-classification", 1),
    "Token": ("token-classification", 3),
}


@pytest.mark.parametrize("head", sorted(CLASSIFIERS))
def test_a_classifier_adapter_goes_up_with_its_own_card_and_loads_by_repo_id_without_hf_fam(base, hub, tmp_path,
                                                                                         head):
    """A LoRA adapter of a FAM classifier (a reward model: PEFT's SEQ_CLS; a tagger: TOKEN_CLS; `score` trained
    with it) on the FAM causal checkpoint: its card loads it as that classifier, and so do PEFT, transformers and
    the pipeline elsewhere, by repo id, with the adapter's scores."""
    import transformers

    from hf_fam.training.lora import fam_lora_config

    task, labels = CLASSIFIERS[head]
    auto = f"AutoModelFor{head}Classification"
    classifier = getattr(transformers, auto).from_pretrained(base, num_labels=labels)
    peft_model = get_peft_model(classifier, fam_lora_config(classifier, r=4, init_lora_weights=False)).eval()
    with torch.no_grad():
        peft_model.base_model.model.score.modules_to_save.default.weight.normal_(0.0, 1.0)
    folder = tmp_path / "tiny-fam-classifier"
    peft_model.save_pretrained(folder)
    AutoTokenizer.from_pretrained(base).save_pretrained(folder)
    ids = _ids(3)
    with torch.no_grad():
        expected = peft_model(ids).logits

    push_to_hub(base, "me/tiny-fam")
    push_to_hub(folder, "me/tiny-fam-classifier", base_model="me/tiny-fam")
    card = (hub.repo("me/tiny-fam-classifier") / "README.md").read_text()
    assert f"pipeline_tag: {task}" in card and f"AutoPeftModelFor{head}Classification" in card
    assert "generate(" not in card
    # its base has two labels (a causal LM's default), the adapter's score another number: the card's calls say so
    assert (f"model = AutoPeftModelFor{head}Classification.from_pretrained(model_id, num_labels={labels}, "
            "trust_remote_code=True)") in card
    assert (f'`{auto}.from_pretrained("me/tiny-fam-classifier", num_labels={labels}, '
            'trust_remote_code=True)`') in card
    assert (f'`pipeline("{task}", model="me/tiny-fam-classifier", trust_remote_code=True, '
            f'model_kwargs={{"num_labels": {labels}}})`') in card

    cache = hub_cache(hub, tmp_path / "cache")
    torch.save({"ids": ids, "expected": expected}, tmp_path / "expected.pt")
    script = f"""
        import os
        os.environ["HF_HUB_CACHE"], os.environ["HF_HUB_OFFLINE"] = {str(cache)!r}, "1"
        import torch
        from peft import AutoPeftModelFor{head}Classification
        from transformers import {auto}, pipeline
        data = torch.load({str(tmp_path / "expected.pt")!r})
        repo = "me/tiny-fam-classifier"
        loaded = {{
            "PEFT": AutoPeftModelFor{head}Classification.from_pretrained(repo, num_labels={labels},
                                                                        trust_remote_code=True),
            "AUTO": {auto}.from_pretrained(repo, num_labels={labels}, trust_remote_code=True),
            "PIPELINE": pipeline("{task}", model=repo, trust_remote_code=True,
                                 model_kwargs={{"num_labels": {labels}}}).model,
        }}
        with torch.no_grad():
            for name, model in loaded.items():
                diff = (model.eval()(data["ids"]).logits - data["expected"]).abs().max().item()
                print(name, type(model).__name__, diff)
    """
    result = run_without_hf_fam(script, tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    for name in (f"PEFT PeftModelFor{head}Classification", f"AUTO FAMFor{head}Classification",
                 f"PIPELINE FAMFor{head}Classification"):
        diff = float(result.stdout.split(name)[1].split()[0])
        assert diff <= 1e-5, (name, diff)
