"""benchmarks/memory_drift.py, the block-by-block start of training in docs/training.md, on a tiny checkpoint:
every start is measured, and the figures hold what the computation guarantees."""

from __future__ import annotations

import json

from conftest import load_script

from hf_fam.tiny import make_tiny_checkpoint


def _script():
    return load_script("benchmarks/memory_drift.py")


def test_every_start_block_by_block(tmp_path):
    base = make_tiny_checkpoint(tmp_path / "tiny")
    out = tmp_path / "drift.json"
    script = _script()
    assert script.main(["--model", str(base), "--tokens", "160", "--block-size", "32", "--memory-segments", "1",
                        "--fam-length", "4", "--threads", "1", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert set(result["starts"]) == set(script.STARTS)
    for start in result["starts"].values():
        assert len(start["block_loss"]) == len(start["logit_change"]) == 5 == len(start["memory_norms"])
    sink, base_row = result["starts"]["sink"], result["base"]
    # within the window C·(M+1) the zero-shot start is the unmodified model, and its memory never changes
    assert sink["block_loss"][:2] == base_row["block_loss"][:2]
    assert len({json.dumps(row) for row in sink["memory_norms"]}) == 1
    # the paper's update changes the memory block after block
    assert len({json.dumps(row) for row in result["starts"]["paper_content"]["memory_norms"]}) > 1
