"""docs/training.md's Python examples run as written, with the Hub id replaced by a local tiny checkpoint."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from hf_fam.tiny import make_tiny_checkpoint

DOC = Path(__file__).resolve().parents[1] / "docs" / "training.md"
HUB_IDS = re.compile(r'"(meta-llama|google|mistralai)/[^"]+"')


def test_training_doc_examples_run(tmp_path, monkeypatch):
    blocks = re.findall(r"```python\n(.*?)```", DOC.read_text(), flags=re.S)
    assert len(blocks) >= 4
    ckpt = make_tiny_checkpoint(tmp_path / "tiny-llama", "llama")
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    for i, block in enumerate(blocks):
        code = HUB_IDS.sub(repr(str(ckpt)), block)
        try:
            exec(compile(code, f"docs/training.md python block {i + 1}", "exec"), namespace)
        except Exception as err:  # pragma: no cover - the message is the point
            pytest.fail(f"docs/training.md python block {i + 1} failed: {type(err).__name__}: {err}\n{block}")
    assert (tmp_path / "llama-fam-merged" / "config.json").exists()
    assert namespace["recipe"].forwards == 3
