"""`hf-fam inspect` and `hf-fam verify`: read a FAM checkpoint without loading it; verify names each difference."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from convert_helpers import make_source
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

import hf_fam
from hf_fam.checkpoint_io.convert import ConvertOptions, convert
from hf_fam.checkpoint_io.inspection import inspect_checkpoint, verify_checkpoint
from hf_fam.cli import main


def _convert(tmp_path, family="llama", layout="single", name="fam"):
    src = make_source(tmp_path / f"src-{family}-{layout}", family, layout)
    out = tmp_path / name
    convert(src, out, ConvertOptions(block_size=4, memory_segments=2, fam_length=3, progress=False))
    return out


def _verify(capsys, path) -> tuple[int, list[str]]:
    capsys.readouterr()
    code = main(["verify", str(path)])
    captured = capsys.readouterr()
    return code, [line.strip() for line in captured.err.splitlines()[1:]]


def test_inspect_reports_the_figures(tmp_path, capsys):
    out = _convert(tmp_path, "mistral", "sharded")
    report = inspect_checkpoint(out)
    s = report.summary
    assert (s.model_type, s.architecture, s.num_layers) == ("mistral", "MistralForCausalLM", 2)
    assert (s.block_size, s.memory_segments, s.fam_length, s.attention_window) == (4, 2, 3, 12)
    base_params = AutoModelForCausalLM.from_pretrained(tmp_path / "src-mistral-sharded").num_parameters()
    assert report.parameters == base_params + 3 * 64 and report.fam_parameters == 3 * 64
    # per layer and sequence: K and V of (M+1)·C + F tokens for 2 KV heads of 16, plus the F x hidden FAM, fp32
    assert s.kv_cache_bytes_per_layer == 2 * (3 * 4 + 3) * 2 * 16 * 4 + 3 * 64 * 4
    assert report.code_matches and len(report.weight_files) == 10

    capsys.readouterr()
    assert main(["inspect", str(out)]) == 0
    text = capsys.readouterr().out
    for needle in ("mistral (MistralForCausalLM): 2 layers, hidden 64, 4 heads / 2 KV heads of 16",
                   "block_size C=4, memory_segments M=2, fam_length F=3",
                   "12 tokens (C·(M+1)) + 3 FAM tokens per layer",
                   f"{report.parameters:,} ({base_params:,} base + 192 fam_init), float32",
                   "4.5 KiB per sequence", f"identical to the installed hf_fam {hf_fam.__version__}"):
        assert needle in text, needle
    assert main(["inspect", str(out), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["code_matches"] is True and data["summary"]["attention_window"] == 12


def test_inspect_shows_code_that_differs(tmp_path, capsys):
    out = _convert(tmp_path)
    with open(out / "fam_core.py", "a") as f:
        f.write("\n# local change\n")
    capsys.readouterr()
    assert main(["inspect", str(out)]) == 0
    assert "DIFFERS from the installed hf_fam" in capsys.readouterr().out and "fam_core.py differs" in \
        "\n".join(f"{k} {v}" for k, v in inspect_checkpoint(out).code.items())


@pytest.mark.parametrize("family", ["llama", "gemma"])
def test_verify_passes_for_convert_and_save_pretrained(tmp_path, capsys, family):
    out = _convert(tmp_path, family, "sharded")
    code, problems = _verify(capsys, out)
    assert code == 0 and problems == []
    saved = tmp_path / "saved"
    base = AutoModelForCausalLM.from_pretrained(tmp_path / f"src-{family}-sharded")
    hf_fam.FAMForCausalLM.from_base_model(base, block_size=4, memory_segments=1, fam_length=2).save_pretrained(saved)
    assert verify_checkpoint(saved) == []


def test_verify_catches_a_modified_code_file(tmp_path, capsys):
    out = _convert(tmp_path)
    source = (out / "modeling_fam.py").read_text()
    (out / "modeling_fam.py").write_text(source.replace("FAMMemory", "FAMMemory ", 1))
    (out / "fam_cache.py").unlink()
    code, problems = _verify(capsys, out)
    assert code == 1
    assert problems == [f"code: fam_cache.py missing (installed hf_fam {hf_fam.__version__})",
                        f"code: modeling_fam.py differs (installed hf_fam {hf_fam.__version__})"]


def test_verify_catches_a_missing_tensor(tmp_path, capsys):
    out = _convert(tmp_path)
    tensors = load_file(out / "model.safetensors")
    del tensors["model.layers.1.mlp.up_proj.weight"]
    save_file(tensors, out / "model.safetensors", metadata={"format": "pt"})
    code, problems = _verify(capsys, out)
    assert code == 1 and problems == ["weights: missing tensor model.layers.1.mlp.up_proj.weight (128, 64)"]


def test_verify_catches_a_tensor_missing_from_its_shard(tmp_path, capsys):
    out = _convert(tmp_path, "gemma", "sharded")
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shard = index["weight_map"]["model.norm.weight"]
    tensors = load_file(out / shard)
    del tensors["model.norm.weight"]
    save_file(tensors, out / shard, metadata={"format": "pt"})
    code, problems = _verify(capsys, out)
    assert code == 1 and problems == [
        f"weights: {shard} does not hold model.norm.weight, which the weight index places there; re-download {shard}"
    ]


def test_verify_catches_wrong_shape_dtype_extra_tensor_and_missing_fam_init(tmp_path, capsys):
    out = _convert(tmp_path)
    tensors = load_file(out / "model.safetensors")
    tensors["model.norm.weight"] = tensors["model.norm.weight"].half()
    tensors["model.layers.0.input_layernorm.weight"] = torch.ones(32)
    tensors["stray"] = torch.zeros(1)
    del tensors["fam.fam_init"]
    save_file(tensors, out / "model.safetensors", metadata={"format": "pt"})
    code, problems = _verify(capsys, out)
    assert code == 1
    assert set(problems) == {
        "weights: model.layers.0.input_layernorm.weight (in model.safetensors) has shape (32,), "
        "config.json implies (64,)",
        "weights: model.norm.weight (in model.safetensors) is float16, config.json says float32",
        "weights: missing tensor fam.fam_init (3, 64)",
        "weights: unexpected tensor stray",
    }


def test_verify_catches_a_missing_shard_and_a_wrong_auto_map(tmp_path, capsys):
    out = _convert(tmp_path, "llama", "sharded")
    (out / "model-00004-of-00010.safetensors").unlink()
    config = json.loads((out / "config.json").read_text())
    config["auto_map"]["AutoModelForCausalLM"] = "modeling_other.Other"
    (out / "config.json").write_text(json.dumps(config))
    code, problems = _verify(capsys, out)
    assert code == 1 and len(problems) == 2
    assert problems[0].startswith("config: auto_map is")
    assert problems[1].startswith("weights: missing shard model-00004-of-00010.safetensors")


@pytest.mark.parametrize("command", ["inspect", "verify"])
def test_not_a_fam_checkpoint(tmp_path, capsys, command):
    src = make_source(tmp_path / "src", "llama")
    capsys.readouterr()
    assert main([command, str(src)]) == 2
    err = capsys.readouterr().err.strip()
    assert err == (f"hf-fam {command}: error: not a FAM checkpoint (model_type 'llama'); "
                   "convert it first with `hf-fam convert`")
    assert main([command, str(tmp_path / "nope")]) == 2
    assert "is not a local folder" in capsys.readouterr().err


def test_console_script(tmp_path):
    """The installed `hf-fam` entry point: verify a tampered checkpoint, exit 1 with the difference named."""
    out = _convert(tmp_path, "gemma")
    (out / "fam_adapters.py").write_text("# not hf_fam's\n")
    hf_fam_bin = os.path.join(os.path.dirname(sys.executable), "hf-fam")
    checked = subprocess.run([hf_fam_bin, "verify", str(out)], capture_output=True, text=True, timeout=300)
    assert checked.returncode == 1
    assert checked.stderr.splitlines() == [
        f"{out}: 1 difference(s) from hf_fam {hf_fam.__version__}:",
        f"  code: fam_adapters.py differs (installed hf_fam {hf_fam.__version__})",
    ]
