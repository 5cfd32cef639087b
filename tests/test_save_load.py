"""save_pretrained writes a FAM checkpoint; it loads with hf_fam, and with trust_remote_code without it."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest
import torch
from conftest import assert_close, padding_mask, random_ids, tiny_model
from safetensors import safe_open
from transformers import AutoModelForCausalLM

import hf_fam

REMOTE_FILES = {
    "configuration_fam.py", "modeling_fam.py", "fam_core.py", "fam_state.py", "fam_adapters.py", "fam_compat.py",
    "fam_cache.py", "fam_settings.py", "fam_graphs.py", "fam_chain.py", "fam_chain_grad.py", "fam_generation.py",
    "fam_packing.py", "fam_forward.py", "fam_plan.py", "fam_wrapping.py", "fam_block_attention.py",
    "fam_split_attention.py", "fam_loss.py", "fam_compile.py", "fam_pretrained.py",
}


def _models(family):
    yield "FAMForCausalLM", hf_fam.FAMForCausalLM.from_base_model(tiny_model(family), block_size=4, memory_segments=1,
                                                                  fam_length=3)
    yield "patched", hf_fam.patch(tiny_model(family), block_size=4, memory_segments=1, fam_length=3)


@pytest.mark.parametrize("kind", ["FAMForCausalLM", "patched"])
def test_save_then_auto_load_gives_identical_logits(family, kind, tmp_path):
    model = dict(_models(family))[kind].eval()
    ids = random_ids(2, 19)
    mask = padding_mask([19, 11], 19)
    with torch.no_grad():
        expected = model(ids, attention_mask=mask).logits
    model.save_pretrained(tmp_path)

    files = {p.name for p in tmp_path.iterdir()}
    assert REMOTE_FILES <= files
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["model_type"] == "fam" and config["base_config"]["model_type"] == family
    assert config["auto_map"] == {
        "AutoConfig": "configuration_fam.FAMConfig",
        "AutoModel": "modeling_fam.FAMModel",
        "AutoModelForCausalLM": "modeling_fam.FAMForCausalLM",
        "AutoModelForSequenceClassification": "modeling_fam.FAMForSequenceClassification",
        "AutoModelForTokenClassification": "modeling_fam.FAMForTokenClassification",
    }
    with safe_open(tmp_path / "model.safetensors", "pt") as f:
        keys = set(f.keys())
    assert "fam.fam_init" in keys and all(not k.startswith("_") for k in keys)

    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert isinstance(loaded, hf_fam.FAMForCausalLM)
    with torch.no_grad():
        got = loaded(ids, attention_mask=mask).logits
    assert_close(got, expected, atol=0.0)


def test_remote_code_loads_where_hf_fam_cannot_be_imported(family, tmp_path):
    model = hf_fam.FAMForCausalLM.from_base_model(tiny_model(family), block_size=5, memory_segments=1,
                                                  fam_length=2).eval()
    ids = random_ids(2, 23)
    with torch.no_grad():
        expected = model(ids).logits
    ckpt = tmp_path / "ckpt"
    model.save_pretrained(ckpt)
    torch.save({"ids": ids, "expected": expected}, tmp_path / "ref.pt")
    script = textwrap.dedent(
        f"""
        import sys
        sys.modules["hf_fam"] = None  # `import hf_fam` fails in this process
        try:
            import hf_fam
            raise SystemExit("hf_fam importable")
        except ImportError:
            pass
        import torch
        from transformers import AutoModelForCausalLM
        model = AutoModelForCausalLM.from_pretrained({str(ckpt)!r}, trust_remote_code=True).eval()
        assert type(model).__module__.startswith("transformers_modules"), type(model).__module__
        ref = torch.load({str(tmp_path / "ref.pt")!r})
        with torch.no_grad():
            diff = (model(ref["ids"]).logits - ref["expected"]).abs().max().item()
        print("DIFF", diff)
        """
    )
    env_cwd = str(tmp_path)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=env_cwd, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    diff = float(result.stdout.split("DIFF")[1])
    assert diff == 0.0


def test_remote_code_files_import_only_torch_and_transformers():
    import ast
    from pathlib import Path

    folder = Path(hf_fam.__file__).parent / "modeling"
    for path in folder.glob("*.py"):
        if path.name == "__init__.py":
            continue
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                roots = {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom):
                if node.level > 0:
                    continue  # relative import of a sibling
                roots = {node.module.split(".")[0]}
            else:
                continue
            allowed = {"torch", "transformers", "__future__", "math", "dataclasses", "typing", "contextlib",
                       "inspect", "sys", "os", "collections", "functools", "warnings", "copy", "contextvars", "weakref",
                       "types", "importlib", "json"}  # importlib: push_to_hub reaches hf_fam's publisher
            assert roots <= allowed, f"{path.name} imports {roots - allowed}"
        assert REMOTE_FILES >= {path.name}, f"{path.name} is not in REMOTE_FILES"
