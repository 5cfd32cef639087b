"""`hf-fam finetune ADAPTER`: a finished run's adapter trained further, saved as a new adapter for the same base,
starting from the adapter's weights; options the adapter fixes are refused in one line."""

from __future__ import annotations

import json
import shutil
from dataclasses import replace

import pytest
import torch
from safetensors.torch import load_file

from hf_fam.cli import main
from hf_fam.runtime.loading import load_fam_model
from hf_fam.tiny import make_tiny_checkpoint
from hf_fam.training.finetune import DataOptions, FinetuneConfig, LoraOptions, ModelOptions, TrainOptions, finetune
from hf_fam.training.options import DEFAULT_LORA_RANK

WEIGHTS = "adapter_model.safetensors"


def _reset_accelerate():
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


def _finetune(config):
    try:
        return finetune(config)
    finally:
        _reset_accelerate()


def _config(path, out, lr=1e-2, steps=3, lora=None, **model):
    return FinetuneConfig(
        model=ModelOptions(path=str(path), **model),
        data=DataOptions(passkey_form="synthetic", seq_len=24, passkey_examples=8),
        lora=lora or LoraOptions(),
        train=TrainOptions(output_dir=str(out), max_steps=steps, batch_size=2, learning_rate=lr, log_every=1),
    )


@pytest.fixture(scope="module")
def first_run(tmp_path_factory):
    """An adapter as `hf-fam finetune` leaves it: trained 3 steps on a base converted on the fly (OUT/fam_base)."""
    root = tmp_path_factory.mktemp("continue")
    base = make_tiny_checkpoint(root / "tiny-llama", "llama")
    out = root / "first"
    _finetune(_config(base, out, block_size=8, memory_segments=1, fam_length=4,
                      lora=LoraOptions(r=4, init="peft")))
    return out


def _ids():
    return torch.randint(3, 250, (2, 30), generator=torch.Generator().manual_seed(0))


def _logits(source):
    model = load_fam_model(str(source), adapters=True)[0]
    with torch.no_grad():
        return model(_ids()).logits


def test_an_adapter_trains_further_from_its_own_weights_for_the_same_base(first_run, tmp_path):
    first_config = json.loads((first_run / "adapter_config.json").read_text())
    # a learning rate too small to move any weight: the new adapter is the first one, so training started there
    still = tmp_path / "still"
    _finetune(_config(first_run, still, lr=1e-30, steps=2))
    before, after = load_file(first_run / WEIGHTS), load_file(still / WEIGHTS)
    assert before.keys() == after.keys() and any("fam_init" in k for k in before)
    for key in before:
        assert torch.equal(before[key], after[key]), key
    assert torch.equal(_logits(still), _logits(first_run))

    more = tmp_path / "more"
    config = _config(first_run, more, lr=1e-2, steps=3)
    result = _finetune(replace(config, train=replace(config.train, merge=True)))
    assert result.steps == 3
    saved = json.loads((more / "adapter_config.json").read_text())
    assert saved["base_model_name_or_path"] == first_config["base_model_name_or_path"] == str(first_run / "fam_base")
    # PEFT writes target_modules from a set: its order is the process's string hashing, not a setting
    def settings(adapter_config):
        return {k: sorted(v) if isinstance(v, list) else v for k, v in adapter_config.items()
                if k in ("r", "lora_alpha", "target_modules", "modules_to_save")}

    assert settings(saved) == settings(first_config)
    assert not (more / "fam_base").exists()  # the base is the first run's, not copied
    summary = json.loads((more / "train_summary.json").read_text())
    assert summary["continued_from"] == str(first_run) and summary["base_model"] == str(first_run / "fam_base")
    changed = load_file(more / WEIGHTS)
    assert any(not torch.equal(before[k], changed[k]) for k in before)
    assert (_logits(more) - _logits(first_run)).abs().max() > 1e-4  # trained further
    merged = load_fam_model(str(more / "merged"))[0]
    with torch.no_grad():
        assert (merged(_ids()).logits - _logits(more)).abs().max() <= 1e-5


@pytest.mark.parametrize("start_kind", ["adapter", "checkpoint"])
def test_the_card_of_the_new_adapter_does_not_carry_the_start_s_results(first_run, tmp_path, start_kind):
    """The results on the start's card were measured before this training (an adapter started from a converted
    checkpoint whose card had results used to show them as its own)."""
    from hf_fam.checkpoint_io.convert import ConvertOptions, convert

    start = tmp_path / "start"
    if start_kind == "adapter":
        shutil.copytree(first_run, start)
    else:
        convert(first_run.parent / "tiny-llama", start, ConvertOptions(block_size=8, memory_segments=1, fam_length=4,
                                                                       progress=False))
    results = tmp_path / "eval.json"
    results.write_text(json.dumps({"results": [{"task": "passkey retrieval", "metric": "accuracy", "value": 0.75,
                                                "setting": "4x window"}]}))
    assert main(["card", str(start), "--eval-results", str(results), "--license", "apache-2.0"]) == 0
    assert "| passkey retrieval |" in (start / "README.md").read_text()
    out = tmp_path / "out"
    assert main(["finetune", str(start), "--output", str(out), "--steps", "1", "--passkey-form", "synthetic",
                 "--seq-len", "24", "--passkey-examples", "4", "--batch-size", "2",
                 *(["--lora-rank", "4"] if start_kind == "checkpoint" else [])]) == 0
    _reset_accelerate()
    card = (out / "README.md").read_text()
    assert "license: apache-2.0" in card and "| passkey retrieval |" not in card
    summary = json.loads((out / "train_summary.json").read_text())
    assert summary.get("continued_from") == (str(start) if start_kind == "adapter" else None)
    assert ("1 steps more, from an earlier adapter's weights" in card) == (start_kind == "adapter")


@pytest.mark.parametrize("extra, needle", [
    (["--lora-rank", "8"], "drop --lora-rank, or train a new adapter from its base"),
    # given at their defaults: still not the adapter's to change (its rank is 4, its dropout 0)
    (["--lora-rank", str(DEFAULT_LORA_RANK), "--lora-dropout", "0"], "drop --lora-rank, --lora-dropout, or train"),
    (["--lora-targets", "q_proj", "--freeze-norms"], "drop --lora-targets, --freeze-norms"),
    (["--memory-start-text", "hello"], "drop --memory-start-text"),
    (["--full"], "--full trains every weight of a checkpoint"),
    (["--block-size", "16"], "block_size 8; --block-size 16 only applies to base checkpoints"),
])
def test_what_the_adapter_fixes_is_refused_in_one_line(first_run, tmp_path, capsys, extra, needle):
    out = tmp_path / "out"
    assert main(["finetune", str(first_run), "--output", str(out), "--steps", "1", *extra]) == 2
    _reset_accelerate()
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("hf-fam finetune: error:") and needle in err, err
    assert not out.exists()


def test_an_adapter_on_a_zero_shot_base_is_refused(first_run, tmp_path, capsys):
    """An adapter naming a checkpoint in the zero-shot start was trained with the paper's update, which that base
    does not run; its run saved the base it trained on as OUT/fam_base."""
    from hf_fam.checkpoint_io.convert import ConvertOptions, convert

    sink = tmp_path / "sink-fam"
    convert(first_run.parent / "tiny-llama", sink, ConvertOptions(block_size=8, memory_segments=1, fam_length=4,
                                                                  progress=False))
    adapter = tmp_path / "adapter"
    shutil.copytree(first_run, adapter, ignore=shutil.ignore_patterns("fam_base"))
    config = json.loads((adapter / "adapter_config.json").read_text())
    (adapter / "adapter_config.json").write_text(json.dumps({**config, "base_model_name_or_path": str(sink)}))
    assert main(["finetune", str(adapter), "--output", str(tmp_path / "out"), "--steps", "1"]) == 2
    _reset_accelerate()
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "is in the zero-shot start (fam_update 'sink')" in err and "OUT/fam_base" in err, err


def test_an_adapter_targeting_a_regular_expression_is_described_as_one(first_run, tmp_path, capsys):
    """PEFT takes `target_modules` as a list or as a regular expression: the refusal names the expression, not its
    characters one by one."""
    adapter = tmp_path / "regex"
    shutil.copytree(first_run, adapter, ignore=shutil.ignore_patterns("fam_base"))
    config = json.loads((adapter / "adapter_config.json").read_text())
    (adapter / "adapter_config.json").write_text(json.dumps({**config, "target_modules": r".*\.(q|v)_proj"}))
    assert main(["finetune", str(adapter), "--output", str(tmp_path / "out"), "--lora-rank", "8"]) == 2
    _reset_accelerate()
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert r"targets modules matching .*\.(q|v)_proj, its own fam_init" in err, err


def test_a_moved_run_folder_loads_its_adapter_on_the_base_inside_it(first_run, tmp_path):
    """An adapter names its base by the absolute path where the run was made (OUT/fam_base); the run's folder,
    copied to another machine, holds that base: hf_fam's loaders read it there (PEFT's own loader would not)."""
    moved = tmp_path / "elsewhere"
    shutil.copytree(first_run, moved)
    config = json.loads((moved / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(first_run / "fam_base")
    gone = "/no/such/machine/runs/first/fam_base"  # the path it was made at, absent here
    (moved / "adapter_config.json").write_text(json.dumps({**config, "base_model_name_or_path": gone}))
    assert torch.equal(_logits(moved), _logits(first_run))
