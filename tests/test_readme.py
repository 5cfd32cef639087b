"""The README's Python examples run as written, with the Hub id replaced by a local tiny checkpoint."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from hf_fam.tiny import make_tiny_checkpoint

README = Path(__file__).resolve().parents[1] / "README.md"
HUB_IDS = re.compile(r'"(meta-llama|google|mistralai)/[^"]+"')


def python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def test_readme_examples_run(tmp_path, monkeypatch):
    blocks = python_blocks()
    assert blocks, "the README has no Python example"
    ckpt = make_tiny_checkpoint(tmp_path / "tiny-llama", "llama")
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    for i, block in enumerate(blocks):
        code = HUB_IDS.sub(repr(str(ckpt)), block)
        try:
            exec(compile(code, f"README.md python block {i + 1}", "exec"), namespace)
        except Exception as err:  # pragma: no cover - the message is the point
            pytest.fail(f"README python block {i + 1} failed: {type(err).__name__}: {err}\n{block}")
    assert (tmp_path / "llama-fam" / "config.json").exists()
