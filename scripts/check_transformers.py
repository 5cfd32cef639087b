#!/usr/bin/env python
"""Test hf_fam against one transformers release in a virtual environment of its own.

    python scripts/check_transformers.py --floor                    # the oldest supported release, compat tests,
                                                                    # with the floors of PEFT, accelerate, datasets
    python scripts/check_transformers.py --newest --raise-ceiling   # PyPI's newest release, full suite; if it
                                                                    # passes, declare it supported
    python scripts/check_transformers.py --each-minor --report benchmarks/results/transformers_releases.json
                                                                    # every minor release inside the range (its
                                                                    # newest patch), compat tests, one venv

The environment gets torch==2.13.0 (the CPU wheel on this project's machines), the release under test, the other
dependencies of pyproject.toml, and this checkout (editable, without its dependencies, so a release above the
declared ceiling can be installed). The tests run there with HF_FAM_OTHER_PYTHON set to the python running this
script, so remote code is also tested across the two releases (tests/test_compat.py), and with
HF_FAM_ALLOW_UNTESTED_TRANSFORMERS=1 when the release is outside the declared range. `--raise-ceiling` writes the
new ceiling into hf_fam/modeling/fam_compat.py (SUPPORTED_TRANSFORMERS) and pyproject.toml before the tests (the
range check and remote code across releases test the raised range) and puts the old one back if they fail.
`--each-minor` reinstalls only transformers (and what it needs) release after release in one environment, records
each release's pytest summary and seconds in `--report` as it goes, and exits non-zero if any release failed.
Exit status: the tests'.
"""

from __future__ import annotations

import argparse
import ast
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import tomllib

ROOT = Path(__file__).resolve().parents[1]
COMPAT = ROOT / "hf_fam" / "modeling" / "fam_compat.py"
PYPROJECT = ROOT / "pyproject.toml"
TORCH = "torch==2.13.0"  # any other spec pulls a multi-GB CUDA build on this project's machines
# What differs between releases: the schedules, generation and the cache, save/load and remote code (all
# families), LoRA, gradient checkpointing, the range itself, `hf-fam verify`, and the families' classifier heads.
COMPAT_TESTS = [
    "tests/test_equivalence.py", "tests/test_streaming.py", "tests/test_save_load.py", "tests/test_families.py",
    "tests/test_lora.py", "tests/test_gradient_checkpointing.py", "tests/test_compat.py", "tests/test_compat_verify.py",
    "tests/test_backbone.py", "tests/test_settings.py", "tests/test_sequence_classification.py",
    "tests/test_token_classification.py", "tests/test_model_outputs.py", "tests/test_adapter_modules_to_save.py",
]


def supported_range() -> tuple[str, str]:
    for node in ast.parse(COMPAT.read_text()).body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "SUPPORTED_TRANSFORMERS"
                                                for t in node.targets):
            return ast.literal_eval(node.value)
    raise SystemExit(f"no SUPPORTED_TRANSFORMERS in {COMPAT}")


def minor(version: str) -> tuple[int, int]:
    major, minor_, *_ = (int(re.match(r"\d*", p)[0] or 0) for p in version.split(".") + ["0"])
    return major, minor_


def releases_by_minor() -> dict[tuple[int, int], str]:
    """The newest final patch of every minor release on the index, as pip sees it: {(5, 12): "5.12.1", ...}."""
    out = subprocess.run([sys.executable, "-m", "pip", "index", "versions", "transformers"], capture_output=True,
                         text=True, check=True).stdout
    newest: dict[tuple[int, int], str] = {}
    for v in re.search(r"Available versions: (.*)", out)[1].split(", "):
        if re.fullmatch(r"\d+\.\d+\.\d+", v):
            key = minor(v)
            if key not in newest or int(v.rsplit(".", 1)[1]) > int(newest[key].rsplit(".", 1)[1]):
                newest[key] = v
    return newest


def newest_on_pypi() -> str:
    """The newest final transformers release, as pip sees the index."""
    releases = releases_by_minor()
    return releases[max(releases)]


# at the floor, these are installed at their own declared floors, so the oldest releases are tested together
FLOOR_PINNED = ("peft", "accelerate", "datasets")
# the client tests' libraries (not among COMPAT_TESTS), not installed at the floor: trl and lm-eval need newer
# PEFT/accelerate/datasets than those floors; bitsandbytes only serves tests/test_quantized.py
CLIENT_TEST_ONLY = ("trl", "lm-eval", "bitsandbytes")


def other_requirements(floors: bool = False) -> list[str]:
    """pyproject.toml's dependencies and test extras but torch and transformers; with `floors`, FLOOR_PINNED at
    their declared floors (`peft>=0.18` -> `peft==0.18.0`) and without CLIENT_TEST_ONLY."""
    project = tomllib.loads(PYPROJECT.read_text())["project"]
    requirements = [r for r in project["dependencies"] + project["optional-dependencies"]["test"]
                    if not re.match(r"(torch|transformers)\b", r)]
    if not floors:
        return requirements
    pinned = []
    for requirement in requirements:
        name, _, floor = re.match(r"([A-Za-z0-9_.-]+)\s*(>=\s*([0-9.]+))?", requirement).groups()
        if name in CLIENT_TEST_ONLY:
            continue
        if name in FLOOR_PINNED:
            release = floor + ".0" * (2 - floor.count("."))  # 1.3 -> 1.3.0
            requirement = f"{name}=={release}"
        pinned.append(requirement)
    return pinned


def venv_python(venv: Path) -> Path:
    return venv / "bin" / "python"


def installed(python: Path, requirements: list[str]) -> bool:
    """Whether the environment satisfies every requirement (a venv made for other pins is not reused)."""
    check = ("import sys; from importlib.metadata import version; from packaging.requirements import Requirement; "
             "reqs = [Requirement(r) for r in sys.argv[1:]]; "
             "sys.exit(not all(r.specifier.contains(version(r.name), prereleases=True) for r in reqs))")
    return subprocess.run([str(python), "-c", check, *requirements], capture_output=True).returncode == 0


def installed_transformers(python: Path) -> str | None:
    result = subprocess.run([str(python), "-c", "import transformers; print(transformers.__version__)"],
                            capture_output=True, text=True)
    return result.stdout.strip() if result.returncode == 0 else None


def prepare(venv: Path, version: str, floors: bool = False, torch: str = TORCH) -> Path:
    python = venv_python(venv)
    requirements = [torch, f"transformers=={version}", *other_requirements(floors)]
    if python.exists() and installed_transformers(python) == version and installed(python, requirements):
        print(f"reusing {venv} (transformers {version})", flush=True)
    else:
        print(f"creating {venv} with transformers {version}" + (" and the floors of "
              f"{', '.join(FLOOR_PINNED)}" if floors else ""), flush=True)
        subprocess.run([sys.executable, "-m", "venv", "--clear", str(venv)], check=True)
        pip = [str(python), "-m", "pip", "install", "--quiet", "--disable-pip-version-check"]
        subprocess.run(pip + requirements, check=True)
    subprocess.run([str(python), "-m", "pip", "install", "--quiet", "--disable-pip-version-check", "--no-deps", "-e",
                    str(ROOT)], check=True)
    return python


def each_minor(args, env: dict[str, str]) -> int:
    """Run the compatibility tests on the newest patch of every minor release inside the declared range, one
    environment reinstalled release after release; write one record per release to args.report as it goes."""
    floor, ceiling = supported_range()
    versions = [v for key, v in sorted(releases_by_minor().items()) if minor(floor) <= key <= minor(ceiling)]
    venv = args.venv or Path(tempfile.gettempdir()) / "hf_fam_transformers_each_minor"
    report = Path(args.report) if args.report else None
    records: list[dict] = []
    tests = COMPAT_TESTS if (args.tests or "compat") == "compat" else []
    print(f"testing {len(versions)} releases: {', '.join(versions)}", flush=True)
    for i, version in enumerate(versions):
        start = time.time()
        python = venv_python(venv)
        if i == 0:  # a fresh environment, unless one with this release is there
            prepare(venv, version, torch=args.torch)
        elif installed_transformers(python) != version:
            subprocess.run([str(python), "-m", "pip", "install", "--quiet", "--disable-pip-version-check",
                            "--upgrade-strategy", "only-if-needed", f"transformers=={version}"], check=True)
        install_s = time.time() - start
        run_env = dict(env)
        if installed_transformers(Path(args.other_python)) not in (None, version):
            run_env["HF_FAM_OTHER_PYTHON"] = args.other_python
        start = time.time()
        result = subprocess.run([str(python), "-m", "pytest", "-q", "-p", "no:cacheprovider", *tests], cwd=ROOT,
                                env=run_env, capture_output=True, text=True)
        lines = [line for line in result.stdout.splitlines() if line.strip()]
        summary = lines[-1].strip("= ") if lines else result.stderr.strip()[-200:]
        failed = [line for line in result.stdout.splitlines() if line.startswith(("FAILED", "ERROR"))]
        records.append({"transformers": version, "passed": result.returncode == 0, "summary": summary,
                        "failures": failed, "install_s": round(install_s), "test_s": round(time.time() - start)})
        print(f"transformers {version}: {summary} ({records[-1]['test_s']} s)", flush=True)
        for line in failed:
            print("  " + line, flush=True)
        if report is not None:
            report.write_text(json.dumps({"range": [floor, ceiling], "tests": "compat" if tests else "full",
                                          "other_python_transformers": installed_transformers(
                                              Path(args.other_python)),
                                          "releases": records}, indent=2) + "\n")
    bad = [r["transformers"] for r in records if not r["passed"]]
    failed = f"; failed: {', '.join(bad)}" if bad else ""
    print(f"{len(records) - len(bad)} of {len(records)} releases passed{failed}", flush=True)
    return 1 if bad else 0


def raise_ceiling(version: str) -> None:
    floor, _ = supported_range()
    ceiling = "%d.%d" % minor(version)
    text = COMPAT.read_text()
    text = re.sub(r'^SUPPORTED_TRANSFORMERS = \(.*\)$', f'SUPPORTED_TRANSFORMERS = ("{floor}", "{ceiling}")', text,
                  count=1, flags=re.M)
    COMPAT.write_text(text)
    major, minor_ = minor(version)
    spec = f"transformers>={floor},<{major}.{minor_ + 1}"
    PYPROJECT.write_text(re.sub(r'"transformers>=[^"]*"', f'"{spec}"', PYPROJECT.read_text(), count=1))
    print(f"declaring transformers {floor} to {ceiling} supported ({spec}) in {COMPAT.relative_to(ROOT)} and "
          f"{PYPROJECT.relative_to(ROOT)}", flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    which = parser.add_mutually_exclusive_group(required=True)
    which.add_argument("--version", help="a transformers release, e.g. 5.24.0")
    which.add_argument("--floor", action="store_true", help="the oldest supported release (x.y.0's newest patch)")
    which.add_argument("--newest", action="store_true", help="the newest release on PyPI")
    which.add_argument("--each-minor", action="store_true",
                       help="every minor release inside the declared range (its newest patch), one after the other")
    parser.add_argument("--report", help="with --each-minor: write each release's result to this JSON file")
    parser.add_argument("--tests", choices=["compat", "full"], help="default: compat for --floor, full otherwise")
    parser.add_argument("--torch", default=TORCH,
                        help=f"the torch requirement of the environment (default: {TORCH}); another release is a "
                        "CUDA build of several GB from PyPI, e.g. torch==2.4.1 to test pyproject's torch floor")
    parser.add_argument("--venv", type=Path, help="default: $TMPDIR/hf_fam_transformers_<version>")
    parser.add_argument("--other-python", default=sys.executable,
                        help="the python whose environment remote code is tested against (default: this one)")
    parser.add_argument("--raise-ceiling", action="store_true",
                        help="when the tests pass above the declared ceiling, declare this release supported")
    args = parser.parse_args(argv)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "TOKENIZERS_PARALLELISM": "false"}
    env.pop("PYTHONPATH", None)
    if args.each_minor:
        return each_minor(args, env)

    floor, ceiling = supported_range()
    if args.floor:
        version = releases_by_minor()[minor(floor)]
    else:
        version = newest_on_pypi() if args.newest else args.version
    tests = args.tests or ("compat" if args.floor else "full")
    torch_tag = "" if args.torch == TORCH else "_" + re.sub(r"\W+", "_", args.torch)
    venv = args.venv or Path(tempfile.gettempdir()) / f"hf_fam_transformers_{version}{torch_tag}"
    start = time.time()
    python = prepare(venv, version, floors=args.floor, torch=args.torch)
    print(f"transformers {version} ready in {time.time() - start:.0f} s", flush=True)

    if installed_transformers(Path(args.other_python)) not in (None, version):
        env["HF_FAM_OTHER_PYTHON"] = args.other_python
    inside = minor(floor) <= minor(version) <= minor(ceiling)
    # Raising the ceiling tests the raised range itself: the range check, and remote code saved by either release
    # loading in the other, pass only once the release is declared. The declaration is undone if the tests fail.
    declared = {path: path.read_text() for path in (COMPAT, PYPROJECT)}
    raising = args.raise_ceiling and minor(version) > minor(ceiling)
    if raising:
        raise_ceiling(version)
        inside = True
    if not inside:
        env["HF_FAM_ALLOW_UNTESTED_TRANSFORMERS"] = "1"
    command = [str(python), "-m", "pytest", "-q",
               "-p", "no:cacheprovider"] + (COMPAT_TESTS if tests == "compat" else [])
    print(f"running {'the compatibility tests' if tests == 'compat' else 'the full suite'} on transformers {version}"
          f"{'' if inside else ' (outside the declared range)'}", flush=True)
    start = time.time()
    code = 1
    try:
        code = subprocess.run(command, cwd=ROOT, env=env).returncode
    finally:  # an interrupted run (Ctrl-C) leaves the declared range as it found it, as a failed one does
        if raising and code != 0:
            for path, text in declared.items():
                path.write_text(text)
            print(f"the declared range is left at {floor} to {ceiling}", flush=True)
    print(f"transformers {version}: tests {'passed' if code == 0 else 'FAILED'} in {time.time() - start:.0f} s",
          flush=True)
    if raising and code == 0:
        print(f"transformers {version} declared supported; run the suite here and commit", flush=True)
    elif args.raise_ceiling:
        print(f"transformers {version} is already inside the declared range {floor} to {ceiling}", flush=True)
    return code


if __name__ == "__main__":
    sys.exit(main())
