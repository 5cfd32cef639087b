"""`hf-fam finetune --save-every N` / `--resume`: a run interrupted after a saved state and resumed ends with the
weights, losses and outputs of the same run uninterrupted; a resumption with other options, without a state, or a
new run over an interrupted one's states is refused in one line."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest

from hf_fam.tiny import make_tiny_checkpoint
from hf_fam.training import recipe as recipe_module
from hf_fam.training.finetune import DataOptions, FinetuneConfig, LoraOptions, ModelOptions, TrainOptions, finetune
from hf_fam.training.resume import states_dir


class Interrupted(Exception):
    pass


@pytest.fixture(scope="module")
def base_ckpt(tmp_path_factory):
    return make_tiny_checkpoint(tmp_path_factory.mktemp("resume") / "tiny-llama", "llama")


def _reset_accelerate():
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


def _config(base_ckpt, out, full=False, **train):
    """Every part of the recipe that carries state across steps is on: Random State Passing (the passed state),
    Random Position Offset (the recipe's generator), LoRA dropout (torch's generator), accumulation over
    micro-batches, a warmup schedule, and more steps than one epoch holds (the data order of a second epoch)."""
    return FinetuneConfig(
        model=ModelOptions(path=str(base_ckpt), block_size=8, memory_segments=1, fam_length=4),
        data=DataOptions(passkey_form="synthetic", seq_len=24, passkey_examples=10),
        lora=LoraOptions(full=True) if full else LoraOptions(r=4, dropout=0.1),  # dropout: the global generator
        train=TrainOptions(output_dir=str(out), max_steps=6, batch_size=2, gradient_accumulation_steps=2,
                           learning_rate=1e-2, lr_scheduler="linear", warmup_steps=2, log_every=1, **train),
    )


def _run(config, interrupt_at_forward: int | None = None, monkeypatch=None):
    if interrupt_at_forward is not None:  # the process dies in the middle of a step (after a state was saved)
        draw = recipe_module.FAMTrainingRecipe.draw

        def dying(self, batch_size):
            if self.forwards + 1 == interrupt_at_forward:
                raise Interrupted
            return draw(self, batch_size)

        monkeypatch.setattr(recipe_module.FAMTrainingRecipe, "draw", dying)
    try:
        return finetune(config)
    finally:
        monkeypatch is not None and monkeypatch.undo()
        _reset_accelerate()


def _losses(out):
    return [json.loads(line)["loss"] for line in (out / "train_log.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("full", [False, True, "pissa", "continued"], ids=["lora", "full", "pissa", "continued"])
def test_an_interrupted_run_resumed_ends_as_the_uninterrupted_run(base_ckpt, tmp_path, monkeypatch, full):
    """`pissa`: a PiSSA start, whose saved adapter is converted at the end against the start kept in the run;
    `continued`: a finished run's adapter trained further (`hf-fam finetune ADAPTER`)."""
    start = None
    if full == "continued":
        start = tmp_path / "start"
        _run(replace(_config(base_ckpt, start), train=replace(_config(base_ckpt, start).train, max_steps=2)))

    def config_for(out, **train):
        config = _config(base_ckpt, out, full=full is True, **train)
        if start is not None:  # the adapter fixes its LoRA settings and its base's C, M, F
            return replace(config, model=ModelOptions(path=str(start)), lora=LoraOptions())
        return replace(config, lora=replace(config.lora, init="pissa")) if full == "pissa" else config

    whole = _run(config_for(tmp_path / "whole"))

    out = tmp_path / "run"
    config = config_for(out, save_every=2)
    with pytest.raises(Interrupted):
        _run(config, interrupt_at_forward=9, monkeypatch=monkeypatch)  # step 5 of 6: states of steps 2 and 4 written
    assert not out.exists()  # no output from an interrupted run
    states = sorted(p.name for p in states_dir(out).iterdir())
    assert states == ["step-4"]  # the newest only, each written whole before the older is removed

    resumed = _run(replace(config, train=replace(config.train, resume=True, log_every=1)))
    assert resumed.steps == 6
    assert resumed.adapter_digests == whole.adapter_digests  # the same trained weights, bit for bit
    assert _losses(out) == _losses(tmp_path / "whole")  # steps 1-4 from the state's log, 5-6 computed again
    assert resumed.final_loss == whole.final_loss
    # the held-out loss at the start comes from the state, the one at the end is measured again: the same figures
    assert resumed.heldout_sequences == whole.heldout_sequences == 1
    assert resumed.heldout_losses == whole.heldout_losses and "start" in whole.heldout_losses
    assert not states_dir(out).exists()  # removed once the run is complete
    name = "model.safetensors" if full is True else "adapter_model.safetensors"
    assert (out / name).read_bytes() == (tmp_path / "whole" / name).read_bytes()


def test_resuming_is_refused_in_one_line_where_it_would_not_continue_the_run(base_ckpt, tmp_path, monkeypatch):
    out = tmp_path / "run"
    config = _config(base_ckpt, out, save_every=2)
    with pytest.raises(ValueError, match="--resume: no training state in .*run.states .*--save-every"):
        _run(replace(config, train=replace(config.train, resume=True)))
    with pytest.raises(Interrupted):
        _run(config, interrupt_at_forward=6, monkeypatch=monkeypatch)
    assert (states_dir(out) / "step-2").is_dir()

    other = replace(config, train=replace(config.train, resume=True, learning_rate=5e-3))
    with pytest.raises(ValueError, match="the interrupted run had train.learning_rate = 0.01, this one 0.005"):
        _run(other)
    with pytest.raises(FileExistsError, match="holds the training states of an interrupted run: continue it with "
                                              "--resume, or pass --force"):
        _run(config)
    fresh = _run(replace(config, train=replace(config.train, overwrite=True, save_every=0)))  # starts over
    assert fresh.steps == 6 and not states_dir(out).exists()


def test_cli_flags(base_ckpt, tmp_path, capsys):
    from hf_fam.cli import main

    out = tmp_path / "cli"
    try:
        code = main(["finetune", str(base_ckpt), "--output", str(out), "--resume", "--block-size", "8",
                     "--memory-segments", "1", "--fam-length", "4"])
    finally:
        _reset_accelerate()
    assert code == 2
    assert "--resume: no training state in" in capsys.readouterr().err.strip().splitlines()[-1]


def test_two_processes_interrupted_and_resumed_end_as_uninterrupted(base_ckpt, tmp_path):
    """Under `accelerate launch` with two CPU processes (gloo): the state holds each process's counters, and both
    processes replay their own shards of the data order."""
    import os
    import subprocess
    import sys

    script = tmp_path / "launch.py"
    script.write_text(
        "import os, sys\n"
        "from hf_fam.training import recipe\n"
        "die_at = int(os.environ.get('DIE_AT_FORWARD', '0'))\n"
        "draw = recipe.FAMTrainingRecipe.draw\n"
        "def dying(self, batch_size):\n"
        "    if self.forwards + 1 == die_at:\n"
        "        sys.exit(3)  # killed in the middle of a step\n"
        "    return draw(self, batch_size)\n"
        "recipe.FAMTrainingRecipe.draw = dying\n"
        "from hf_fam.cli import main\n"
        "sys.exit(main(sys.argv[1:]))\n"
    )
    common = ["--block-size", "8", "--memory-segments", "1", "--fam-length", "4", "--lora-rank", "4",
              "--seq-len", "24", "--passkey-form", "synthetic", "--passkey-examples", "12", "--steps", "4",
              "--batch-size", "2", "--lr", "1e-2", "--log-every", "1", "--cpu"]

    def launch(out, *extra, die_at=0):
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", str(script),
               "finetune", str(base_ckpt), "--output", str(out), *common, *extra]
        env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false",
               "DIE_AT_FORWARD": str(die_at)}
        return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=240)

    whole = launch(tmp_path / "whole")
    assert whole.returncode == 0, whole.stderr[-4000:]
    out = tmp_path / "run"
    interrupted = launch(out, "--save-every", "2", die_at=3)
    assert interrupted.returncode != 0 and (states_dir(out) / "step-2").is_dir() and not out.exists()
    resumed = launch(out, "--save-every", "2", "--resume")
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    summary = json.loads((out / "train_summary.json").read_text())
    expected = json.loads((tmp_path / "whole" / "train_summary.json").read_text())
    assert summary["world_size"] == 2 and summary["adapter_digests"] == expected["adapter_digests"]
    assert _losses(out) == _losses(tmp_path / "whole")
