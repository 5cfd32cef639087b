"""Sharing on the Hub: `hf_fam.checkpoint_io.publish.push_to_hub`, `model.push_to_hub` and `hf-fam push`.

No hub is reachable here, so a stand-in for `huggingface_hub.HfApi` takes the calls and writes each commit's
files into a folder per repo: what the Hub would serve. That folder is then loaded as a user elsewhere would,
in a fresh process where hf_fam cannot be imported, and must give the logits of the checkpoint pushed.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from client_helpers import fam_checkpoint
from convert_helpers import run_without_hf_fam, tree_hashes
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer

import hf_fam
from hf_fam.checkpoint_io import publish
from hf_fam.checkpoint_io.cards import CARD_MARK, CardInfo, write_model_card
from hf_fam.checkpoint_io.publish import push_to_hub
from hf_fam.cli import main


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """A converted tiny Llama with its tokenizer and the card `hf-fam convert` writes."""
    return fam_checkpoint(tmp_path_factory.mktemp("push") / "tiny-fam", route="converted")


def _logits(folder, ids) -> torch.Tensor:
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    with torch.no_grad():
        return model(ids).logits


def _assert_loads_elsewhere(repo: Path, ids: torch.Tensor, expected: torch.Tensor, tmp_path: Path) -> None:
    """The pushed files load where hf_fam cannot be imported, by remote code, with the same logits."""
    torch.save({"ids": ids, "expected": expected}, tmp_path / "expected.pt")
    script = f"""
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer
        data = torch.load({str(tmp_path / "expected.pt")!r})
        model = AutoModelForCausalLM.from_pretrained({str(repo)!r}, trust_remote_code=True).eval()
        if {(repo / "tokenizer_config.json").is_file()}:
            AutoTokenizer.from_pretrained({str(repo)!r}, trust_remote_code=True)
        with torch.no_grad():
            print("DIFF", (model(data["ids"]).logits - data["expected"]).abs().max().item())
        from transformers.utils import hub  # as remote code, model.push_to_hub is transformers' own
        hub.PushToHubMixin.push_to_hub = lambda self, repo_id, **kwargs: print("UPSTREAM", repo_id)
        model.push_to_hub("me/again")
    """
    result = run_without_hf_fam(script, tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    diff = float(result.stdout.split("DIFF")[1].split()[0])
    assert diff <= 1e-5, diff
    assert "UPSTREAM me/again" in result.stdout


def test_a_converted_folder_is_pushed_whole_with_its_card_for_the_repo_and_loads_without_hf_fam(
        converted, hub, tmp_path):
    before = tree_hashes(converted)
    commit = push_to_hub(converted, "tiny-fam-shared")
    repo = hub.repo("me/tiny-fam-shared")
    assert commit.commit_url.startswith("https://huggingface.co/me/tiny-fam-shared")
    assert tree_hashes(converted) == before  # the folder itself is never modified
    pushed = {p.name for p in repo.iterdir()}
    assert pushed == {p.name for p in converted.iterdir() if p.is_file()}
    for name in pushed - {"README.md"}:
        assert (repo / name).read_bytes() == (converted / name).read_bytes(), name
    card = (repo / "README.md").read_text()
    assert 'model_id = "me/tiny-fam-shared"' in card and CARD_MARK in card
    assert 'model_id = "tiny-fam"' in (converted / "README.md").read_text()  # the local card names the folder
    ids = torch.randint(3, 250, (1, 37), generator=torch.Generator().manual_seed(0))
    _assert_loads_elsewhere(repo, ids, _logits(converted, ids), tmp_path)


def test_the_card_keeps_its_metadata_and_a_card_of_ones_own_is_uploaded_as_it_is(tmp_path, hub):
    folder = fam_checkpoint(tmp_path / "carded")
    write_model_card(folder, CardInfo(base_model="org/base-model", license="apache-2.0", fine_tuned=True))
    push_to_hub(folder, "org/carded", tags=["my-tag"])
    card = (hub.repo("org/carded") / "README.md").read_text()
    assert "base_model: org/base-model" in card and "license: apache-2.0" in card and "fine_tuned: true" in card
    assert "- my-tag" in card and 'model_id = "org/carded"' in card
    (folder / "README.md").write_text("# My own card\n")
    push_to_hub(folder, "org/own")
    assert (hub.repo("org/own") / "README.md").read_text() == "# My own card\n"
    (folder / "README.md").unlink()
    push_to_hub(folder, "org/new")
    assert 'model_id = "org/new"' in (hub.repo("org/new") / "README.md").read_text()


@pytest.mark.parametrize("route", ["loaded", "patched"])
def test_model_push_to_hub_pushes_the_fam_checkpoint_with_its_card(converted, hub, tmp_path, route):
    """transformers' own `model.push_to_hub(repo_id)` on a FAM model goes through hf_fam: FAM card, verified."""
    if route == "loaded":
        model = AutoModelForCausalLM.from_pretrained(converted).eval()
    else:
        base = converted.parent / f"{converted.name}-base"
        model = hf_fam.patch(AutoModelForCausalLM.from_pretrained(base).eval(), block_size=8, memory_segments=1,
                             fam_length=4, fam_init="random")
    model.push_to_hub("me/from-model", commit_message="first", private=True)
    assert ("create_repo", "me/from-model", True) in hub.calls
    assert ("create_commit", "me/from-model", "first", None, False) in hub.calls
    repo = hub.repo("me/from-model")
    card = (repo / "README.md").read_text()
    assert 'model_id = "me/from-model"' in card and CARD_MARK in card
    assert json.loads((repo / "config.json").read_text())["model_type"] == "fam"
    assert (repo / "modeling_fam.py").is_file()
    ids = torch.randint(3, 250, (1, 29), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = model(ids).logits
    _assert_loads_elsewhere(repo, ids, expected, tmp_path)


def test_a_full_run_s_records_go_up_without_local_paths(converted, hub, tmp_path):
    """A `hf-fam finetune --full` output is a checkpoint with the run's records: they go up naming local folders
    by their last part (a Hub id as it is); every other file byte for byte."""
    import shutil

    folder = tmp_path / "full-run"
    shutil.copytree(converted, folder)
    summary = {"steps": 3, "base_model": str(converted), "merged": None, "continued_from": "me/earlier"}
    run_config = {"model": {"path": str(converted)}, "train": {"output_dir": str(folder), "merge": False}}
    (folder / "train_summary.json").write_text(json.dumps(summary))
    (folder / "finetune_config.json").write_text(json.dumps(run_config))
    (folder / "train_log.jsonl").write_text('{"step": 1, "loss": 2.0}\n')
    push_to_hub(folder, "me/full-run")
    repo = hub.repo("me/full-run")
    assert json.loads((repo / "train_summary.json").read_text()) == {
        "steps": 3, "base_model": converted.name, "continued_from": "me/earlier"}
    assert json.loads((repo / "finetune_config.json").read_text()) == {
        "model": {"path": converted.name}, "train": {"output_dir": "full-run", "merge": False}}
    assert (repo / "train_log.jsonl").read_bytes() == (folder / "train_log.jsonl").read_bytes()
    assert json.loads((folder / "train_summary.json").read_text()) == summary  # the folder's own is kept


def test_push_with_a_tokenizer_to_a_branch(converted, hub):
    model = AutoModelForCausalLM.from_pretrained(converted)
    push_to_hub(model, "me/branch", tokenizer=AutoTokenizer.from_pretrained(converted), revision="v1", create_pr=True)
    assert ("create_branch", "me/branch", "v1") in hub.calls
    assert ("create_commit", "me/branch", publish.DEFAULT_COMMIT_MESSAGE, "v1", True) in hub.calls
    assert (hub.repo("me/branch") / "tokenizer_config.json").is_file()


def _peft(folder):
    model = AutoModelForCausalLM.from_pretrained(folder)
    return get_peft_model(model, LoraConfig(r=2, target_modules=["q_proj"]))


@pytest.mark.parametrize("case", ["missing tensor", "missing code", "base checkpoint", "adapter folder",
                                  "peft model", "plain model", "no folder", "tokenizer with a folder"])
def test_what_would_not_load_elsewhere_is_refused_before_anything_is_uploaded(converted, hub, tmp_path, case):
    import shutil

    from safetensors.torch import load_file, save_file

    folder = tmp_path / "copy"
    shutil.copytree(converted, folder)
    checkpoint, kwargs = folder, {}
    if case == "missing tensor":
        tensors = load_file(folder / "model.safetensors")
        tensors.pop("fam.fam_init")
        save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
        message = "would not load elsewhere"
    elif case == "missing code":
        (folder / "fam_core.py").unlink()
        message = "fam_core.py is missing"
    elif case == "base checkpoint":
        checkpoint = converted.parent / f"{converted.name}-base"
        message = "not a FAM checkpoint"
    elif case == "adapter folder":
        _peft(converted).save_pretrained(tmp_path / "adapter")
        checkpoint = tmp_path / "adapter"
        message = "which others cannot load: push the base first"  # it names a local base and no --base-model
    elif case == "peft model":
        checkpoint = _peft(converted)
        message = "which others cannot load: push the base first"
    elif case == "plain model":
        checkpoint = AutoModelForCausalLM.from_pretrained(converted.parent / f"{converted.name}-base")
        message = "not a FAM model"
    elif case == "no folder":
        checkpoint = tmp_path / "nowhere"
        message = "is not a folder"
    else:
        kwargs = {"tokenizer": AutoTokenizer.from_pretrained(converted)}
        message = "tokenizer= goes with a model"
    with pytest.raises((ValueError, FileNotFoundError), match=message):
        push_to_hub(checkpoint, "me/refused", **kwargs)
    assert hub.calls == []
    assert not hub.root.exists()


def test_cli_push(converted, hub, capsys):
    assert main(["push", str(converted), "org/cli", "--revision", "dev", "--commit-message", "from the CLI"]) == 0
    out = capsys.readouterr().out
    assert "pushed" in out and f"https://huggingface.co/org/cli/commit/{hub.head('org/cli')}" in out
    assert ("create_commit", "org/cli", "from the CLI", "dev", False) in hub.calls
    assert 'model_id = "org/cli"' in (hub.repo("org/cli") / "README.md").read_text()


def test_cli_push_refuses_in_one_line(tmp_path, hub, capsys):
    assert main(["push", str(tmp_path / "nowhere"), "org/cli"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("hf-fam push: error:") and "is not a folder" in err and "\n" not in err
    assert hub.calls == []


def test_a_fine_tuned_checkpoint_card_keeps_the_start_s_metadata_but_not_its_results(tmp_path):
    from huggingface_hub import EvalResult

    from hf_fam.training.outputs import write_fine_tuned_card

    start = fam_checkpoint(tmp_path / "start")
    result = EvalResult(task_type="text-generation", dataset_type="passkey", dataset_name="passkey",
                        metric_type="accuracy", metric_value=0.5)
    write_model_card(start, CardInfo(base_model="org/base-model", license="apache-2.0", eval_results=[result]))
    trained = fam_checkpoint(tmp_path / "trained")
    write_fine_tuned_card(trained, start)
    card = (trained / "README.md").read_text()
    assert "fine_tuned: true" in card and "base_model: org/base-model" in card and "license: apache-2.0" in card
    assert "0.5" not in card and "model-index" not in card
    write_fine_tuned_card(trained, "org/hub-id")  # a Hub id: nothing known about it
    assert "base_model" not in (trained / "README.md").read_text().split("---")[1]


def test_code_of_another_hf_fam_release_goes_up_as_it_is_with_a_warning(converted, hub, tmp_path, caplog):
    """A checkpoint converted by another hf_fam release carries other code bytes: it loads with its own code, so it
    is pushed, not refused, and the difference is reported."""
    import shutil

    folder = tmp_path / "older"
    shutil.copytree(converted, folder)
    edited = (folder / "fam_core.py").read_text() + "\n# another release\n"
    (folder / "fam_core.py").write_text(edited)
    with caplog.at_level("WARNING", logger="hf_fam.checkpoint_io.publish"):
        push_to_hub(folder, "me/older")
    assert "fam_core.py differs" in caplog.text
    assert (hub.repo("me/older") / "fam_core.py").read_text() == edited


def test_no_network_is_one_line(converted, hub, monkeypatch):
    class ConnectError(Exception):  # what huggingface_hub's HTTP client raises without a network
        __module__ = "httpx"

    def unreachable(*args, **kwargs):
        raise ConnectError("[Errno -2] Name or service not known")

    monkeypatch.setattr(hub, "create_repo", unreachable)
    with pytest.raises(ConnectionError, match="cannot reach the Hub to push to me/x"):
        push_to_hub(converted, "me/x")
