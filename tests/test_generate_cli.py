"""The streaming API and `hf-fam generate`: a long prompt file read at constant memory, then continued."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from conftest import assert_close

from hf_fam.cli import main
from hf_fam.runtime.loading import FAMOverrides, load_fam_model
from hf_fam.runtime.streaming import continue_stream, iter_text_file_tokens, stream, stream_text_file
from hf_fam.tiny import make_tiny_checkpoint


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return make_tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny-llama", "llama")


@pytest.fixture(scope="module")
def prompt_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("prompt") / "prompt.txt"
    path.write_text(" ".join(f"line {i}: the quick brown fox jumps over the lazy dog." for i in range(60)))
    return path


def test_text_file_tokens_equal_whole_text_tokenization(checkpoint, prompt_file):
    _, tok = load_fam_model(str(checkpoint), overrides=FAMOverrides(16, 1, 4))
    pieces = [t for chunk in iter_text_file_tokens(tok, prompt_file, chunk_tokens=100, read_chars=333) for t in chunk]
    whole = [tok.bos_token_id] + tok(prompt_file.read_text(), add_special_tokens=False)["input_ids"]
    assert pieces == whole  # a byte-level tokenizer cut at whitespace gives the same ids


def test_stream_text_file_then_continue_equals_generate_on_the_whole_prompt(checkpoint, prompt_file):
    model, tok = load_fam_model(str(checkpoint), overrides=FAMOverrides(16, 1, 4))
    ids = torch.tensor([[tok.bos_token_id] + tok(prompt_file.read_text(), add_special_tokens=False)["input_ids"]])
    state = stream_text_file(model, tok, prompt_file, chunk_tokens=150)
    assert state.tokens == ids.shape[1]
    with torch.no_grad():
        full = model(ids, use_cache=False).logits[:, -1]
    assert_close(state.last_logits, full, atol=1e-4)
    new = continue_stream(model, state, max_new_tokens=12, do_sample=False)
    expected = model.generate(ids, max_new_tokens=12, do_sample=False)[:, ids.shape[1]:]
    assert torch.equal(new, expected)


def test_stream_accepts_any_chunks(checkpoint):
    model, _ = load_fam_model(str(checkpoint), overrides=FAMOverrides(8, 0, 2))
    ids = torch.randint(3, 200, (1, 50))
    a = stream(model, [ids[0, :1], ids[0, 1:30], [], ids[0, 30:]])
    b = stream(model, [ids])
    assert a.tokens == b.tokens == 50
    assert_close(a.last_logits, b.last_logits, atol=1e-5)


def test_cli_generate_streams_a_continuation(checkpoint, prompt_file, capsys):
    rc = main(["generate", str(checkpoint), "--prompt-file", str(prompt_file), "--max-new-tokens", "5",
               "--block-size", "16", "--memory-segments", "1", "--fam-length", "4", "--chunk-tokens", "200"])
    out = capsys.readouterr()
    assert rc == 0
    assert out.out.endswith("\n")


def test_cli_sampling_follows_the_checkpoint_generation_config_unless_told(checkpoint, tmp_path, capsys):
    """--do-sample without --top-k etc. uses the checkpoint's generation_config (here top_k=1: sampling is then
    greedy whatever the seed), and a flag overrides it."""
    import shutil

    from transformers import GenerationConfig

    folder = tmp_path / "topk1"
    shutil.copytree(checkpoint, folder)
    GenerationConfig(do_sample=True, top_k=1, pad_token_id=0).save_pretrained(folder)
    args = ["generate", str(folder), "--prompt", "the quick brown fox", "--max-new-tokens", "12", "--block-size",
            "16", "--memory-segments", "1", "--fam-length", "4", "--no-progress"]

    def text(*extra):
        assert main(args + list(extra)) == 0
        return capsys.readouterr().out

    greedy = text()
    assert [text("--do-sample", "--seed", str(s)) for s in (1, 2)] == [greedy, greedy]
    sampled = {text("--do-sample", "--top-k", "0", "--seed", str(s)) for s in (1, 2, 3)}
    assert sampled != {greedy}


def test_cli_generate_errors_are_one_line(checkpoint, tmp_path, capsys):
    assert main(["generate", str(checkpoint), "--prompt-file", str(tmp_path / "missing.txt")]) == 2
    assert main(["generate", str(tmp_path / "nowhere"), "--prompt", "hi"]) == 2
    assert main(["generate", str(checkpoint), "--prompt", "hi", "--max-new-tokens", "-1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 3 and all(line.startswith("hf-fam generate: error:") for line in err)


def test_cli_generate_refuses_what_cannot_generate_before_loading(tmp_path, capsys):
    """No tokens to generate, or nothing to read: one line naming the problem, before the model is looked up
    (the model named here does not exist, so any later check would complain about it instead)."""
    empty, blank = tmp_path / "empty.txt", tmp_path / "blank.txt"
    empty.write_text("")
    blank.write_text(" \n\t\n")
    nowhere = str(tmp_path / "nowhere")
    cases = [
        (["--prompt", "hi", "--max-new-tokens", "0"], "--max-new-tokens must be >= 1, got 0"),
        (["--prompt", "hi", "--chunk-tokens", "0"], "--chunk-tokens must be >= 1, got 0"),
        (["--prompt", ""], "the prompt is empty; pass some text with --prompt"),
        (["--prompt-file", str(empty)], f"the prompt file {empty} is empty (or only whitespace)"),
        (["--prompt-file", str(blank)], f"the prompt file {blank} is empty (or only whitespace)"),
    ]
    for extra, needle in cases:
        assert main(["generate", nowhere, *extra]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("hf-fam generate: error: ") and needle in err[0], err


def test_fam_checkpoint_refuses_other_settings(checkpoint, tmp_path):
    model, _ = load_fam_model(str(checkpoint), overrides=FAMOverrides(16, 1, 4))
    model.save_pretrained(tmp_path / "fam")
    with pytest.raises(ValueError, match="only applies to base checkpoints"):
        load_fam_model(str(tmp_path / "fam"), overrides=FAMOverrides(block_size=32))


def test_console_script_help():
    out = subprocess.run([sys.executable, "-m", "hf_fam.cli", "generate", "--help"], capture_output=True, text=True)
    assert out.returncode == 0 and "--prompt-file" in out.stdout
