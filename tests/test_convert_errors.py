"""`hf-fam convert` failures: one clear line, exit status 2, no OUT and no temporary folder left, SRC unchanged."""

from __future__ import annotations

import json
import os
import signal
import time

import pytest
from convert_helpers import make_source, tree_hashes
from transformers import GPT2Config, GPT2LMHeadModel

import hf_fam.checkpoint_io.safetensors_io
from hf_fam.cli import main

SETTINGS = ["--block-size", "4", "--memory-segments", "1", "--fam-length", "3", "--quiet"]


@pytest.fixture
def workdir(tmp_path):
    """A folder holding only the sources; OUT is made inside it."""
    return tmp_path


def run_convert(capsys, src, out, *extra) -> tuple[int, str]:
    capsys.readouterr()  # drop what making the source printed
    code = main(["convert", str(src), str(out), *SETTINGS, *extra])
    err = capsys.readouterr().err.strip()
    return code, err


def assert_fails_cleanly(capsys, workdir, src, needle, *extra, out_name="out"):
    """Conversion fails with one line containing `needle`; the folder is as before; SRC is unchanged."""
    listing = sorted(p.name for p in workdir.iterdir())
    hashes = tree_hashes(src) if src.is_dir() else None
    code, err = run_convert(capsys, src, workdir / out_name, *extra)
    assert code == 2, err
    assert len(err.splitlines()) == 1 and err.startswith("hf-fam convert: error: "), err
    assert needle in err, err
    assert sorted(p.name for p in workdir.iterdir()) == listing  # no OUT, no temporary folder
    if hashes is not None:
        assert tree_hashes(src) == hashes
    return err


def test_unsupported_architecture(capsys, workdir):
    src = workdir / "gpt2"
    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=50, n_positions=64,
                               bos_token_id=0, eos_token_id=0)).save_pretrained(src)
    supported = ", ".join(hf_fam.supported_model_types())
    assert_fails_cleanly(capsys, workdir, src, f"does not support model_type 'gpt2'; supported: {supported}")


def test_missing_config(capsys, workdir):
    src = make_source(workdir / "src", "llama")
    (src / "config.json").unlink()
    assert_fails_cleanly(capsys, workdir, src, "no config.json in")


def test_missing_shard(capsys, workdir):
    src = make_source(workdir / "src", "mistral", "sharded")
    (src / "model-00003-of-00010.safetensors").unlink()
    assert_fails_cleanly(capsys, workdir, src, "missing shard model-00003-of-00010.safetensors")


def test_truncated_shard(capsys, workdir):
    src = make_source(workdir / "src", "llama", "sharded")
    shard = src / "model-00002-of-00010.safetensors"
    shard.write_bytes(shard.read_bytes()[:-100])
    assert_fails_cleanly(capsys, workdir, src, "model-00002-of-00010.safetensors is corrupt or truncated")


def test_corrupt_shard(capsys, workdir):
    src = make_source(workdir / "src", "gemma", "single")
    data = bytearray((src / "model.safetensors").read_bytes())
    data[8:40] = b"#" * 32  # garbage in the JSON header
    (src / "model.safetensors").write_bytes(bytes(data))
    assert_fails_cleanly(capsys, workdir, src, "model.safetensors is corrupt or truncated")


def test_shapes_not_matching_the_config(capsys, workdir):
    src = make_source(workdir / "src", "llama", "sharded")
    config = json.loads((src / "config.json").read_text())
    config["intermediate_size"] = 96
    (src / "config.json").write_text(json.dumps(config))
    err = assert_fails_cleanly(capsys, workdir, src, "do not match its config.json")
    assert "has shape (128, 64), config.json implies (96, 64)" in err and "more)" in err


def test_missing_tensor(capsys, workdir):
    from safetensors.torch import load_file, save_file

    src = make_source(workdir / "src", "llama")
    tensors = load_file(src / "model.safetensors")
    del tensors["model.norm.weight"]
    save_file(tensors, src / "model.safetensors", metadata={"format": "pt"})
    assert_fails_cleanly(capsys, workdir, src, "missing tensor model.norm.weight")


def test_pickle_refused_without_allow_pickle(capsys, workdir):
    import torch

    src = make_source(workdir / "src", "llama")
    torch.save({"x": torch.zeros(1)}, src / "pytorch_model.bin")
    (src / "model.safetensors").unlink()
    assert_fails_cleanly(capsys, workdir, src, "Pass --allow-pickle")


def test_existing_output_refused_without_force(capsys, workdir):
    src = make_source(workdir / "src", "llama")
    (workdir / "out").mkdir()
    (workdir / "out" / "keep.txt").write_text("mine")
    assert_fails_cleanly(capsys, workdir, src, "already exists; pass --force")
    assert (workdir / "out" / "keep.txt").read_text() == "mine"


def test_output_inside_source_refused(capsys, workdir):
    src = make_source(workdir / "src", "llama")
    listing = sorted(p.name for p in src.iterdir())
    code, err = run_convert(capsys, src, src / "fam")
    assert code == 2 and "overlaps SRC" in err
    assert sorted(p.name for p in src.iterdir()) == listing


def test_missing_local_folder(capsys, workdir):
    assert_fails_cleanly(capsys, workdir, workdir / "nope", "no such folder")


def test_hub_id_without_network(capsys, workdir):
    """A Hub-looking id that is not a folder goes to the Hub; offline, that is one clear line."""
    code, err = run_convert(capsys, "some-org/some-model", workdir / "out")
    assert code == 2 and len(err.splitlines()) == 1
    assert "some-org/some-model is not a local folder and is not in the Hub cache, and HF_HUB_OFFLINE is set" in err
    assert list(workdir.iterdir()) == []


@pytest.mark.parametrize(
    "args,needle",
    [
        (["--block-size", "0"], "block_size must be >= 1, got 0"),
        (["--fam-init", "nonsense"], "expected 'bos', 'random', 'text:TEXT' or 'file:PATH'"),
        (["--fam-init", "file:/no/such.safetensors"], "does not exist"),
    ],
)
def test_bad_options(capsys, workdir, args, needle):
    src = make_source(workdir / "src", "llama")
    assert_fails_cleanly(capsys, workdir, src, needle, *args)


def test_failure_while_writing_leaves_nothing(capsys, workdir, monkeypatch):
    """A disk filling up on the third shard: the partial output is removed."""
    src = make_source(workdir / "src", "llama", "sharded")
    real = hf_fam.checkpoint_io.safetensors_io.write_safetensors
    calls = []

    def failing(path, *args, **kwargs):
        calls.append(path)
        if len(calls) == 3:
            raise OSError(28, "No space left on device")
        return real(path, *args, **kwargs)

    monkeypatch.setattr("hf_fam.checkpoint_io.convert.write_safetensors", failing)
    assert_fails_cleanly(capsys, workdir, src, "No space left on device")
    assert len(calls) == 3


def test_interrupt_while_writing_leaves_nothing(capsys, workdir, monkeypatch):
    src = make_source(workdir / "src", "gemma", "sharded")
    listing = sorted(p.name for p in workdir.iterdir())

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr("hf_fam.checkpoint_io.convert.write_safetensors", interrupted)
    assert run_convert(capsys, src, workdir / "out")[0] == 130
    assert sorted(p.name for p in workdir.iterdir()) == listing


def test_sigterm_becomes_an_interrupt():
    """`hf-fam convert` turns SIGTERM into KeyboardInterrupt, so the temporary folder is removed as on Ctrl-C."""
    from hf_fam.cli.commands.convert import _sigterm_as_interrupt

    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(KeyboardInterrupt):
        with _sigterm_as_interrupt():
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(5)  # the handler interrupts the sleep
    assert signal.getsignal(signal.SIGTERM) == before


def test_parent_folders_created_for_out_are_removed_on_failure(capsys, workdir):
    src = make_source(workdir / "src", "llama")
    (src / "config.json").unlink()
    code, _ = run_convert(capsys, src, workdir / "a" / "b" / "out")
    assert code == 2 and not (workdir / "a").exists()

