"""benchmarks/real_finetune.py, the one command behind docs/real_model.md §5, on a tiny checkpoint: it trains
FAM and BSWA with the same data and steps, evaluates them and the base model, and writes JSON, table and plot."""

from __future__ import annotations

import importlib.util
import json

import pytest
from conftest import load_script

from hf_fam.tiny import make_tiny_checkpoint


def _script():
    return load_script("benchmarks/real_finetune.py")


@pytest.mark.skipif(importlib.util.find_spec("matplotlib") is None, reason="the report draws a plot")
def test_one_command_trains_both_and_reports(tmp_path):
    base = make_tiny_checkpoint(tmp_path / "tiny")
    out = tmp_path / "results" / "rf"
    assert _script().main(["--model", str(base), "--out", str(out), "--block-size", "64", "--fam-length", "4",
                           "--steps", "2", "--batch-size", "1", "--seq-len", "320", "--min-seq-len", "300",
                           "--window-multiples", "6", "--trials", "2", "--ppl-tokens", "700",
                           "--base-max-tokens", "600", "--threads", "1", "--text-chars", "20000",
                           "--variants", "fam,bswa,base,zero_shot"]) == 0
    saved = json.loads(out.with_suffix(".json").read_text())
    assert set(saved["train"]) == {"fam", "bswa"} and set(saved["eval"]) == {"fam", "bswa", "base", "zero_shot"}
    assert all(t["steps"] == 2 and len(t["log"]) >= 1 for t in saved["train"].values())
    for name, e in saved["eval"].items():
        assert [r["length"] for r in e["passkey"]] == [384] and e["passkey"][0]["trials"] == 2
        assert e["perplexity"][0]["start"] == 0 and e["perplexity_all"] > 0
    assert saved["settings"]["data"] == "mix"  # passkey and standard-library sources, half each
    assert "| passkey, tokens (x window) |" in out.with_suffix(".md").read_text()
    assert out.with_suffix(".png").stat().st_size > 0


@pytest.mark.skipif(importlib.util.find_spec("matplotlib") is None, reason="the report draws a plot")
@pytest.mark.parametrize("train", ["full", "pissa"])
def test_every_weight_or_a_pissa_start(tmp_path, train):
    """--train full trains every weight (the whole model comes back, nothing to merge); --train pissa LoRA from
    PiSSA's start; the report says which."""
    base = make_tiny_checkpoint(tmp_path / "tiny")
    out = tmp_path / "results" / "rf"
    assert _script().main(["--model", str(base), "--out", str(out), "--block-size", "64", "--fam-length", "4",
                           "--steps", "1", "--batch-size", "1", "--seq-len", "320", "--min-seq-len", "300",
                           "--window-multiples", "6", "--trials", "1", "--ppl-tokens", "300", "--threads", "1",
                           "--data", "passkey", "--variants", "fam", "--train", train, "--lr", "5e-5"]) == 0
    saved = json.loads(out.with_suffix(".json").read_text())
    assert saved["settings"]["train"] == train and saved["train"]["fam"]["steps"] == 1
    said = {"full": "passkey 300-320 tokens, every weight, lr 5e-05",
            "pissa": "passkey 300-320 tokens, LoRA r=32 from PiSSA's start, lr 5e-05"}[train]
    assert said in out.with_suffix(".md").read_text()
