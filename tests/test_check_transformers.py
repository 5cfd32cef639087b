"""`scripts/check_transformers.py --raise-ceiling` declares a release before its tests and leaves the declared
range as it found it when the tests fail or are interrupted. The venv and the test run are replaced by fakes;
the files it writes are copies."""

from __future__ import annotations

import subprocess
from pathlib import Path
from types import SimpleNamespace

import pytest
from conftest import load_script

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def script(tmp_path, monkeypatch):
    module = load_script("scripts/check_transformers.py")
    for name in ("COMPAT", "PYPROJECT"):
        copy = tmp_path / getattr(module, name).name
        copy.write_text(getattr(module, name).read_text())
        monkeypatch.setattr(module, name, copy)
    monkeypatch.setattr(module, "ROOT", tmp_path)
    monkeypatch.delenv("HF_FAM_ALLOW_UNTESTED_TRANSFORMERS", raising=False)  # the script decides it
    monkeypatch.setattr(module, "prepare", lambda venv, version, floors=False, torch=module.TORCH: tmp_path / "python")
    monkeypatch.setattr(module, "installed_transformers", lambda python: None)
    return module


def above_ceiling(script) -> str:
    major, minor = script.minor(script.supported_range()[1])
    return f"{major}.{minor + 1}.0"


def run_with(script, monkeypatch, outcome) -> tuple[int | None, dict]:
    seen = {}

    def fake_run(command, cwd, env):
        seen["range"] = script.supported_range()
        seen["env"] = env
        if isinstance(outcome, BaseException):
            raise outcome
        return SimpleNamespace(returncode=outcome)

    monkeypatch.setattr(subprocess, "run", fake_run)
    code = script.main(["--version", above_ceiling(script), "--raise-ceiling"])
    return code, seen


@pytest.mark.parametrize("outcome", [1, KeyboardInterrupt()], ids=["tests fail", "interrupted"])
def test_the_declared_range_is_restored(script, monkeypatch, outcome):
    before = {path: path.read_text() for path in (script.COMPAT, script.PYPROJECT)}
    if isinstance(outcome, BaseException):
        with pytest.raises(KeyboardInterrupt):
            run_with(script, monkeypatch, outcome)
    else:
        assert run_with(script, monkeypatch, outcome)[0] == 1
    assert {path: path.read_text() for path in before} == before


def test_the_tests_run_under_the_raised_range_and_it_stays(script, monkeypatch):
    version = above_ceiling(script)
    floor = script.supported_range()[0]
    code, seen = run_with(script, monkeypatch, 0)
    raised = (floor, "%d.%d" % script.minor(version))
    assert code == 0 and seen["range"] == raised and script.supported_range() == raised
    assert "HF_FAM_ALLOW_UNTESTED_TRANSFORMERS" not in seen["env"]
    major, minor = script.minor(version)
    assert f'"transformers>={floor},<{major}.{minor + 1}"' in script.PYPROJECT.read_text()


def test_the_floor_environment_pins_the_dependency_floors(script):
    """--floor tests the oldest releases together: PEFT, accelerate and datasets at the floors pyproject.toml
    declares, without the client tests' libraries (which need newer ones and are not among the compat tests)."""
    import tomllib

    declared = tomllib.loads(script.PYPROJECT.read_text())["project"]["dependencies"]
    floors = script.other_requirements(floors=True)
    for name in script.FLOOR_PINNED:
        (spec,) = [d for d in declared if d.startswith(name + ">=")]
        release = spec.split(">=")[1]
        assert f"{name}=={release}{'.0' * (2 - release.count('.'))}" in floors
    assert not [r for r in floors if r.startswith(script.CLIENT_TEST_ONLY)]
    newest = script.other_requirements()
    assert [r for r in newest if r.startswith("trl")] and "peft==" not in " ".join(newest)


def test_another_torch_goes_into_the_venv_and_its_name(script, monkeypatch):
    """`--torch torch==2.4.1` (how the torch floor was tested) reaches the environment's requirements and gets a
    venv of its own, so the CI's torch==2.13.0 venv for the same release is not rebuilt."""
    prepared = {}
    monkeypatch.setattr(script, "prepare", lambda venv, version, floors=False, torch=script.TORCH:
                        prepared.update(venv=venv, torch=torch) or venv / "python")
    monkeypatch.setattr(subprocess, "run", lambda command, cwd, env: SimpleNamespace(returncode=0))
    assert script.main(["--version", "5.4.0", "--torch", "torch==2.4.1"]) == 0
    assert prepared["torch"] == "torch==2.4.1" and prepared["venv"].name == "hf_fam_transformers_5.4.0_torch_2_4_1"
    assert script.main(["--version", "5.4.0"]) == 0
    assert prepared["torch"] == script.TORCH and prepared["venv"].name == "hf_fam_transformers_5.4.0"
    monkeypatch.setattr(script, "releases_by_minor", lambda: {(5, 4): "5.4.0"})
    monkeypatch.setattr(subprocess, "run", lambda command, cwd, env, **kwargs: SimpleNamespace(
        returncode=0, stdout="1 passed", stderr=""))
    monkeypatch.setattr(script, "installed_transformers", lambda python: "5.4.0")
    assert script.main(["--each-minor", "--torch", "torch==2.4.1"]) == 0
    assert prepared["torch"] == "torch==2.4.1"
