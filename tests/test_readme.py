"""The Python examples of the README and of docs/ run as written, the Hub id replaced by a local tiny
checkpoint; the `hf-fam` commands the README shows parse with the real command line."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from hf_fam.cli import build_parser
from hf_fam.tiny import make_tiny_checkpoint

ROOT = Path(__file__).resolve().parents[1]
HUB_IDS = re.compile(r'"(meta-llama|google|mistralai)/[^"]+"')


def run_python_blocks(doc: Path, tmp_path: Path) -> dict:
    blocks = re.findall(r"```python\n(.*?)```", doc.read_text(), flags=re.S)
    assert blocks, f"{doc.name} has no Python example"
    ckpt = make_tiny_checkpoint(tmp_path / "tiny-llama", "llama")
    namespace: dict = {}
    for i, block in enumerate(blocks):
        code = HUB_IDS.sub(repr(str(ckpt)), block)
        try:
            exec(compile(code, f"{doc.name} python block {i + 1}", "exec"), namespace)
        except Exception as err:  # pragma: no cover - the message is the point
            pytest.fail(f"{doc.name} python block {i + 1} failed: {type(err).__name__}: {err}\n{block}")
    return namespace


def test_readme_examples_run(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    run_python_blocks(ROOT / "README.md", tmp_path)
    assert (tmp_path / "llama-fam-patched" / "config.json").exists()


def test_readme_quickstarts_write_each_to_its_own_folder():
    """Followed in order, no quickstart writes into a folder an earlier one wrote (convert and finetune refuse
    an existing one): the patch example saves llama-fam-patched, convert writes llama-fam, finetune
    llama-fam-lora."""
    text = (ROOT / "README.md").read_text()
    quick = text[text.index("## Quickstarts"):]
    quick = quick[:quick.index("\n## ", 1)]
    written = re.findall(r'save_pretrained\("([^"]+)"\)', quick)
    written += re.findall(r"^hf-fam convert \S+ (\S+)", quick, flags=re.M)
    written += re.findall(r"^hf-fam finetune .*?--output (\S+)", quick, flags=re.M)
    assert written == ["llama-fam-patched", "llama-fam", "llama-fam-lora"], written


def test_training_doc_examples_run(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    namespace = run_python_blocks(ROOT / "docs" / "training.md", tmp_path)
    assert (tmp_path / "llama-fam-merged" / "config.json").exists()
    assert namespace["recipe"].forwards == 3


def test_readme_commands_parse():
    """Every `hf-fam ...` line of the README's shell blocks names real commands and options."""
    parser = build_parser()
    shell = "\n".join(re.findall(r"```(?:bash|sh)\n(.*?)```", (ROOT / "README.md").read_text(), flags=re.S))
    lines = [line.split("#")[0].strip() for line in shell.splitlines()]
    commands = [shlex.split(line)[1:] for line in lines if line.startswith("hf-fam ")]
    assert commands, "the README shows no hf-fam command"
    for argv in commands:
        try:
            parser.parse_args(argv)
        except SystemExit as err:
            pytest.fail(f"README command does not parse: hf-fam {' '.join(argv)} ({err})")
