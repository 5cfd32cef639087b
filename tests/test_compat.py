"""The supported transformers range: declared once, checked by the shipped code at load, and remote code that
works across it (issue 16).

The cross-release tests need a second environment with another transformers release: set HF_FAM_OTHER_PYTHON to
its python (`.ci/run` and `scripts/check_transformers.py` do). A checkpoint saved here loads there, and one saved
there loads here, each in a process where hf_fam cannot be imported, with the same logits.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import tomllib
import torch
import transformers
from test_families import build, fam

import hf_fam
from hf_fam.modeling import fam_compat
from hf_fam.modeling.fam_compat import (
    ALLOW_UNTESTED_ENV,
    SUPPORTED_TRANSFORMERS,
    UnsupportedTransformersError,
    check_transformers_version,
    supported_range_spec,
    unsupported_transformers_message,
)

ROOT = Path(__file__).resolve().parents[1]
TESTS = Path(__file__).resolve().parent
OTHER_PYTHON = os.environ.get("HF_FAM_OTHER_PYTHON")
# one family per code path that differs between releases: sdpa (Llama), eager with soft-capping (Gemma 2, which
# older releases would run with sdpa and without the capping), q/k/v biases and sliding-window layers (Qwen 2)
CROSS_FAMILIES = ("llama-tied", "gemma2", "qwen2", "mixtral")
BLOCK_HF_FAM = 'import sys\nsys.modules["hf_fam"] = None  # `import hf_fam` fails in this process\n'


def test_pyproject_declares_the_range_the_shipped_code_checks():
    spec = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    declared = [d for d in spec if d.replace(" ", "").startswith("transformers")]
    assert declared == [f"transformers{supported_range_spec()}"], declared
    assert supported_range_spec() == (f">={SUPPORTED_TRANSFORMERS[0]},"
                                      f"<5.{int(SUPPORTED_TRANSFORMERS[1].split('.')[1]) + 1}")


def test_the_installed_transformers_is_inside_the_range():
    assert unsupported_transformers_message(transformers.__version__) is None, transformers.__version__


@pytest.mark.parametrize("version", [SUPPORTED_TRANSFORMERS[0] + ".0", SUPPORTED_TRANSFORMERS[1] + ".0",
                                     SUPPORTED_TRANSFORMERS[1] + ".3"])
def test_inside_the_range_nothing_is_raised(version):
    assert unsupported_transformers_message(version) is None
    check_transformers_version(version)


def _below_floor() -> str:
    major, minor = fam_compat._minor(SUPPORTED_TRANSFORMERS[0])
    return f"{major}.{minor - 1}.0"


def _above_ceiling() -> str:
    major, minor = fam_compat._minor(SUPPORTED_TRANSFORMERS[1])
    return f"{major}.{minor + 1}.0.dev0"


@pytest.mark.parametrize("version", ["below", "above", "6.0.0", "4.57.6"])
def test_outside_the_range_one_line_names_version_range_and_fix(version, monkeypatch):
    version = {"below": _below_floor(), "above": _above_ceiling()}.get(version, version)
    monkeypatch.delenv(ALLOW_UNTESTED_ENV, raising=False)
    with pytest.raises(UnsupportedTransformersError) as info:
        check_transformers_version(version)
    message = str(info.value)
    assert "\n" not in message
    assert f"transformers {version} is installed" in message and supported_range_spec() in message
    assert "pip install 'transformers" in message
    if fam_compat._minor(version) > fam_compat._minor(SUPPORTED_TRANSFORMERS[1]):
        assert "hf-fam verify --refresh-code" in message  # a newer hf_fam may support it
    monkeypatch.setenv(ALLOW_UNTESTED_ENV, "1")
    check_transformers_version(version)  # the escape hatch for trying a new release


def test_every_remote_file_is_a_direct_relative_import_of_an_auto_map_module():
    """Loading from a local folder, transformers 5.4 to 5.8 copy only an auto_map module's own relative imports
    (found by transformers' regular expression) into that module's cache folder, and then import the module with
    everything it reaches: each auto_map module must import directly every file it reaches through the others
    (modeling_fam reached fam_settings only through its siblings: 5.8.1 failed to load every checkpoint with
    "No such file ... fam_settings.py"). And every remote-code file is reached."""
    from transformers.dynamic_module_utils import get_relative_imports

    from hf_fam.checkpoint_io.checkpoint import AUTO_MAP, MODELING_DIR, remote_code_files

    reached = set()
    for entry in {target.split(".")[0] for target in AUTO_MAP.values()}:
        direct = set(get_relative_imports(str(MODELING_DIR / f"{entry}.py")))
        closure, todo = set(), list(direct)
        while todo:
            name = todo.pop()
            if name not in closure:
                closure.add(name)
                todo += get_relative_imports(str(MODELING_DIR / f"{name}.py"))
        assert closure - {entry} <= direct, f"{entry}.py reaches {sorted(closure - direct - {entry})} only indirectly"
        reached |= {entry + ".py"} | {name + ".py" for name in closure}
    assert {p.name for p in remote_code_files()} <= reached


def _save_checkpoint(tmp_path: Path) -> tuple[Path, torch.Tensor, torch.Tensor]:
    model = fam(build("llama-tied"), 4, 1, 2)
    ids = torch.randint(3, 101, (1, 13), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        logits = model(ids).logits
    model.save_pretrained(tmp_path / "ckpt")
    return tmp_path / "ckpt", ids, logits


def _run(python: str, script: str, cwd: Path, extra_env: dict | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_MODULES_CACHE": str(cwd / "hf_modules"), "HF_HUB_OFFLINE": "1", **(extra_env or {})}
    env.pop(ALLOW_UNTESTED_ENV, None)
    return subprocess.run([python, "-c", script], capture_output=True, text=True, cwd=str(cwd), env=env, timeout=600)


@pytest.mark.parametrize("where", ["below", "above"])
def test_shipped_code_refuses_an_unsupported_transformers_at_load(tmp_path, where):
    """Where hf_fam cannot be imported, loading a checkpoint under a transformers outside the range stops in
    from_pretrained with the one line, not later in a forward. (The installed release is made to report another
    version number: the check reads `transformers.__version__`.)"""
    ckpt, _, _ = _save_checkpoint(tmp_path)
    version = _below_floor() if where == "below" else _above_ceiling()
    script = BLOCK_HF_FAM + textwrap.dedent(
        f"""
        import transformers
        transformers.__version__ = {version!r}
        from transformers import AutoModelForCausalLM
        try:
            AutoModelForCausalLM.from_pretrained({str(ckpt)!r}, trust_remote_code=True)
        except ImportError as err:
            print("REFUSED", type(err).__name__)
            print(err)
        else:
            print("LOADED")
        """
    )
    result = _run(sys.executable, script, tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    lines = result.stdout.strip().splitlines()
    assert lines[0] == "REFUSED UnsupportedTransformersError", result.stdout
    assert lines[1:] == [unsupported_transformers_message(version)]


def test_config_load_also_refuses(tmp_path):
    """AutoConfig alone (the first thing from_pretrained loads) hits the check too."""
    ckpt, _, _ = _save_checkpoint(tmp_path)
    script = BLOCK_HF_FAM + textwrap.dedent(
        f"""
        import transformers
        transformers.__version__ = {_below_floor()!r}
        from transformers import AutoConfig
        try:
            AutoConfig.from_pretrained({str(ckpt)!r}, trust_remote_code=True)
        except ImportError as err:
            print(type(err).__name__)
        """
    )
    result = _run(sys.executable, script, tmp_path)
    assert result.stdout.strip() == "UnsupportedTransformersError", (result.stdout, result.stderr[-2000:])


# --- across releases --------------------------------------------------------------------------------------------
needs_other = pytest.mark.skipif(
    not OTHER_PYTHON,
    reason="HF_FAM_OTHER_PYTHON is not set: it must name the python of a second environment with another "
    "transformers release (.ci/run and scripts/check_transformers.py set it); without it, remote code is not "
    "tested across releases",
)

SAVE_SCRIPT = """
import sys, torch
sys.path.insert(0, {tests!r})
from test_families import build, fam
import hf_fam, transformers
out = {{}}
for name in {families!r}:
    model = fam(build(name), 4, 1, 2)
    ids = torch.randint(3, 101, (2, 19), generator=torch.Generator().manual_seed(7))
    mask = torch.ones_like(ids)
    mask[1, :5] = 0  # a left-padded row
    with torch.no_grad():
        out[name] = (ids, mask, model(ids, attention_mask=mask).logits)
    model.save_pretrained({folder!r} + "/" + name)
torch.save(out, {folder!r} + "/expected.pt")
print(transformers.__version__)
"""

LOAD_SCRIPT = BLOCK_HF_FAM + """
import torch, transformers
from transformers import AutoModelForCausalLM
expected = torch.load({folder!r} + "/expected.pt")
for name, (ids, mask, logits) in expected.items():
    model = AutoModelForCausalLM.from_pretrained({folder!r} + "/" + name, trust_remote_code=True).eval()
    assert type(model).__module__.startswith("transformers_modules"), type(model).__module__
    with torch.no_grad():
        got = model(ids, attention_mask=mask).logits
    print(name, model.config.base_config._attn_implementation, (got - logits).abs().max().item())
print(transformers.__version__)
"""


def _other_env() -> dict:
    return {"PYTHONPATH": str(ROOT)}  # the other environment imports this checkout's hf_fam when it may


def _check_load(result: subprocess.CompletedProcess, families) -> dict[str, float]:
    assert result.returncode == 0, result.stderr[-3000:]
    lines = result.stdout.strip().splitlines()
    diffs = {}
    for line in lines[:-1]:
        name, _impl, diff = line.split()
        diffs[name] = float(diff)
    assert sorted(diffs) == sorted(families), result.stdout
    return diffs


@needs_other
def test_saved_here_loads_in_the_other_release_without_hf_fam(tmp_path):
    script = SAVE_SCRIPT.format(tests=str(TESTS), families=CROSS_FAMILIES, folder=str(tmp_path))
    saved = _run(sys.executable, script, tmp_path, _other_env())
    assert saved.returncode == 0, saved.stderr[-3000:]
    loaded = _run(OTHER_PYTHON, LOAD_SCRIPT.format(folder=str(tmp_path)), tmp_path)
    diffs = _check_load(loaded, CROSS_FAMILIES)
    other_version = loaded.stdout.strip().splitlines()[-1]
    assert other_version != transformers.__version__, "HF_FAM_OTHER_PYTHON runs the same transformers release"
    print("max |logits difference|", transformers.__version__, "->", other_version, diffs)
    assert max(diffs.values()) <= 1e-5, (transformers.__version__, "->", other_version, diffs)


@needs_other
def test_saved_in_the_other_release_loads_here_without_hf_fam(tmp_path):
    script = SAVE_SCRIPT.format(tests=str(TESTS), families=CROSS_FAMILIES, folder=str(tmp_path))
    saved = _run(OTHER_PYTHON, script, tmp_path, _other_env())
    assert saved.returncode == 0, saved.stderr[-3000:]
    other_version = saved.stdout.strip().splitlines()[-1]
    assert other_version != transformers.__version__, "HF_FAM_OTHER_PYTHON runs the same transformers release"
    loaded = _run(sys.executable, LOAD_SCRIPT.format(folder=str(tmp_path)), tmp_path)
    diffs = _check_load(loaded, CROSS_FAMILIES)
    print("max |logits difference|", other_version, "->", transformers.__version__, diffs)
    assert max(diffs.values()) <= 1e-5, (other_version, "->", transformers.__version__, diffs)


@needs_other
def test_converted_in_the_other_release_loads_here_without_hf_fam(tmp_path):
    """`hf-fam convert` (shard by shard, no model built) under the other release; loaded here."""
    src = tmp_path / "src"
    script = textwrap.dedent(
        f"""
        import transformers
        from hf_fam.tiny import make_tiny_checkpoint
        from hf_fam.checkpoint_io.convert import ConvertOptions, convert
        make_tiny_checkpoint({str(src)!r}, "gemma", initializer_range=0.2)
        convert({str(src)!r}, {str(tmp_path / "fam")!r}, ConvertOptions(block_size=4, memory_segments=1, fam_length=2,
                                                                        fam_update="paper", progress=False))
        print(transformers.__version__)
        """
    )
    converted = _run(OTHER_PYTHON, script, tmp_path, _other_env())
    assert converted.returncode == 0, converted.stderr[-3000:]
    assert converted.stdout.strip().splitlines()[-1] != transformers.__version__
    ids = torch.randint(3, 101, (1, 17), generator=torch.Generator().manual_seed(3))
    patched = transformers.AutoModelForCausalLM.from_pretrained(src).eval()
    fam_init = hf_fam.FAMForCausalLM.from_pretrained(tmp_path / "fam").fam.fam_init.detach()
    model = hf_fam.FAMForCausalLM.from_base_model(patched, block_size=4, memory_segments=1, fam_length=2,
                                                  fam_init=fam_init).eval()
    with torch.no_grad():
        expected = model(ids).logits
    torch.save({"gemma": (ids, torch.ones_like(ids), expected)}, tmp_path / "expected.pt")
    (tmp_path / "gemma").symlink_to(tmp_path / "fam")
    loaded = _run(sys.executable, LOAD_SCRIPT.format(folder=str(tmp_path)), tmp_path)
    diffs = _check_load(loaded, ["gemma"])
    print("max |logits difference| converted", converted.stdout.strip().splitlines()[-1],
          "->", transformers.__version__, diffs)
    assert diffs["gemma"] <= 1e-5, diffs


def test_verify_reads_the_range_from_code_without_importing_it():
    from hf_fam.checkpoint_io.checkpoint import MODELING_DIR, code_transformers_range

    assert code_transformers_range(MODELING_DIR) == SUPPORTED_TRANSFORMERS
