"""The package layout holds: moved modules answer to their old names (with a DeprecationWarning), the console
script and package data name what exists, no module imports back into the command line's entry point, and the
benchmarks import only the package."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest
import tomllib

from hf_fam._moved import MOVED, new_name

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "hf_fam"


def _imports(path: Path) -> set[str]:
    """The absolute names of the modules `path` imports (relative imports resolved), at any depth."""
    module = ".".join(path.relative_to(ROOT).with_suffix("").parts)
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = f"{parent}.{base}" if base else parent
            names.add(base)
            names.update(f"{base}.{alias.name}" for alias in node.names)
    return names


def test_old_module_paths_still_import_with_one_deprecation_warning():
    # a fresh interpreter: this session has imported the new paths already, and maybe some old ones
    script = f"""
import importlib, json, sys, warnings
import hf_fam
report = {{}}
for old, new in {json.dumps(sorted(MOVED.items()))} + [["hf_fam.commands.eval", "hf_fam.cli.commands.eval"]]:
    with warnings.catch_warnings(record=True) as first:
        warnings.simplefilter("always")
        exec(f"import {{old}}")  # an import statement: the warning must point at it
        module = sys.modules[old]
    with warnings.catch_warnings(record=True) as again:
        warnings.simplefilter("always")
        importlib.import_module(old)
    report[old] = dict(
        same=module is importlib.import_module(new), in_parent=getattr(sys.modules[old.rpartition(".")[0]],
        old.rpartition(".")[2]) is module,
        first=[(w.category.__name__, str(w.message), w.filename) for w in first if new in str(w.message)],
        again=[str(w.message) for w in again if "deprecated" in str(w.message)])
print(json.dumps(report))
"""
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout.splitlines()[-1])
    assert set(report) >= set(MOVED)
    for old, seen in report.items():
        assert seen["same"] and seen["in_parent"], f"{old} is not the moved module itself"
        assert len(seen["first"]) == 1, f"{old}: {seen['first']}"
        category, message, filename = seen["first"][0]
        assert category == "DeprecationWarning" and old in message
        assert filename == "<string>", f"{old}: the warning points at {filename}, not at the importing line"
        assert not seen["again"], f"{old} warned twice"


def test_old_names_point_at_modules_that_exist():
    for old, new in MOVED.items():
        assert (PACKAGE.parent / (new.replace(".", "/") + ".py")).exists() or \
            (PACKAGE.parent / new.replace(".", "/") / "__init__.py").exists(), new
        assert not (PACKAGE.parent / (old.replace(".", "/") + ".py")).exists(), f"{old} exists again: drop the alias"
    assert new_name("hf_fam.commands.generate") == "hf_fam.cli.commands.generate"
    assert new_name("hf_fam.modeling.fam_core") is None


def test_console_script_and_package_data_name_what_exists():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    module, _, function = project["project"]["scripts"]["hf-fam"].partition(":")
    assert module == "hf_fam.cli" and function == "main"
    from hf_fam import cli

    assert callable(getattr(cli, function))
    for pattern in project["tool"]["setuptools"]["package-data"]["hf_fam"]:
        assert list(PACKAGE.glob(pattern)), f"package-data names {pattern}, which matches no file"


@pytest.mark.parametrize("path", sorted(PACKAGE.rglob("*.py")), ids=lambda p: str(p.relative_to(ROOT)))
def test_no_module_imports_back_into_the_command_line_entry_point(path):
    imported = _imports(path)
    entry = {"hf_fam.cli", "hf_fam.cli.main", "hf_fam.cli.main.main"}
    if path.parent == PACKAGE / "cli" and path.name in ("__init__.py", "__main__.py"):
        return  # the package re-exports main; `python -m hf_fam.cli` runs it
    assert not imported & entry, f"{path.relative_to(ROOT)} imports {sorted(imported & entry)}"
    if not path.is_relative_to(PACKAGE / "cli"):
        cli = sorted(name for name in imported if name.startswith("hf_fam.cli"))
        assert not cli, f"{path.relative_to(ROOT)}: the library imports the command line ({cli})"


def test_benchmarks_import_only_the_package():
    tests = {p.stem for p in (ROOT / "tests").glob("*.py")}
    for path in sorted((ROOT / "benchmarks").glob("*.py")):
        text = path.read_text()
        assert '"tests"' not in text and "'tests'" not in text, f"{path.name} reaches into tests/"
        assert not {name.split(".")[0] for name in _imports(path)} & tests, f"{path.name} imports a test module"


@pytest.mark.parametrize("folder", ["benchmarks", "scripts"])
def test_every_package_name_the_scripts_import_exists(folder):
    """The GPU scripts (cuda_checks.py, gpu_compile_ab.py, ...) never run here and import the package inside
    their functions: a renamed name would first fail on a lent GPU, in its few minutes. Resolve each one."""
    import importlib

    missing = []
    for path in sorted((ROOT / folder).glob("*.py")):
        for name in sorted(n for n in _imports(path) if n.startswith("hf_fam")):
            try:
                importlib.import_module(name)
            except ModuleNotFoundError:
                module, _, attribute = name.rpartition(".")
                if not hasattr(importlib.import_module(module), attribute):
                    missing.append(f"{path.name}: {name}")
    assert not missing, f"names that no longer exist: {missing}"
