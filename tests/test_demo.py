"""`hf-fam demo` end to end on a minute's budget: it writes its table, JSON, plot and a loadable checkpoint.

(The real figures come from the full run; this only checks the machinery.)
"""

from __future__ import annotations

import json

import torch
from transformers import AutoModelForCausalLM

from hf_fam.cli import main


def test_demo_runs_end_to_end(tmp_path, capsys):
    out = tmp_path / "demo"
    rc = main(["demo", "--out", str(out), "--steps", "6", "--trials", "10", "--sequential",
               "--pretrain-steps", "20", "--eval-multiples", "1", "2"])
    assert rc == 0
    table = capsys.readouterr().out
    assert "| length | × window | FAM all | BSWA all |" in table
    results = json.loads((out / "results.json").read_text())
    assert set(results["runs"]) == {"FAM", "BSWA"}
    assert results["runs"]["FAM"]["history"]["steps"] == results["runs"]["BSWA"]["history"]["steps"] == 6
    rows = results["runs"]["BSWA"]["eval"]["rows"]
    assert [r["length"] for r in rows] == [64, 128]
    assert all(r.get("beyond_reach_accuracy") in (None, 0.0) for r in rows)  # BSWA never sees beyond reach
    assert (out / "passkey.png").stat().st_size > 0
    ckpt = out / "fam-passkey-model"
    assert "passkey retrieval" in (ckpt / "README.md").read_text()
    model = AutoModelForCausalLM.from_pretrained(ckpt).eval()
    with torch.no_grad():
        assert model(torch.tensor([[30, 1, 2, 3, 4, 5, 31, 12, 32]])).logits.shape == (1, 9, 33)


def test_far_keys_are_beyond_reach_anywhere_and_near_keys_in_the_window():
    """Far training keys sit more than L·M blocks before the query's block, at varied depths (not only the
    first block: that invited a first-block shortcut); near keys sit in the last attention window."""
    import random

    from hf_fam.apps.demo import VOCAB, DemoConfig, make_batch

    config = DemoConfig()
    C, reach = config.block_size, config.num_layers * config.memory_segments

    def key_and_query_blocks(cfg, seq_len):
        ids, _ = make_batch(cfg, seq_len, random.Random(0), 200)
        key = (ids == VOCAB.key).float().argmax(1)
        query = (ids == VOCAB.query).float().argmax(1)
        return key // C, query // C

    far = DemoConfig(far_key_prob=1.0, near_key_prob=0.0)
    key_block, query_block = key_and_query_blocks(far, 384)
    assert bool(((query_block - key_block) > reach).all())
    assert len(set(key_block.tolist())) >= 6  # spread over the blocks beyond reach, not one block
    near = DemoConfig(far_key_prob=0.0, near_key_prob=1.0)
    ids, _ = make_batch(near, 384, random.Random(0), 200)
    key = (ids == VOCAB.key).float().argmax(1)
    assert bool((key >= 384 - config.window).all())


def test_pretraining_race_picks_the_fewest_steps_whatever_the_schedule():
    """The short-context candidates race from the same weights; the winner is the first, in steps, to reach
    the goal (ties: the earlier learning rate), in worker processes and one after the other alike."""
    from dataclasses import replace

    from hf_fam.apps.demo import DemoConfig, pretrain

    # a goal reached after the first 10 steps at either rate: a tie, so the first rate wins
    config = replace(DemoConfig(), pretrain_steps=30, pretrain_stop_at=0.0, pretrain_lrs=(1e-3, 2e-3))
    runs = {}
    for parallel in (False, True):
        base, history = pretrain(config, parallel=parallel)
        runs[parallel] = (base.state_dict(), history)
        assert history["reached"] and history["steps"] == 10 and history["lr"] == 1e-3
        assert [c["lr"] for c in history["candidates"]] == [1e-3, 2e-3]
        assert all(c["steps"] <= 11 for c in history["candidates"])  # the loser gives up past the winner
    for name, tensor in runs[False][0].items():
        assert torch.allclose(tensor, runs[True][0][name], atol=1e-4), name  # thread counts differ
    # a goal nobody reaches: both run to the cap, the better final exact match wins, and it says so
    config = replace(config, pretrain_steps=12, pretrain_stop_at=1.01)
    base, history = pretrain(config, parallel=False)
    assert not history["reached"] and [c["steps"] for c in history["candidates"]] == [12, 12]


def test_demo_without_matplotlib_stops_before_any_work(tmp_path, capsys, monkeypatch):
    """A plain install has no matplotlib: one line naming the extra, before minutes of training, nothing written."""
    import importlib.util

    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "matplotlib" else real_find_spec(name, *a))
    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out), "--steps", "1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["hf-fam demo: error: the demo draws passkey.png with matplotlib, which is not installed: "
                   "pip install 'hf-fam[demo]' (or pip install matplotlib), or pass --no-plot"]
    assert not out.exists()
    assert main(["bench", "--parts", "train"]) == 2
    assert "pip install 'hf-fam[bench]'" in capsys.readouterr().err
    result = tmp_path / "eval.json"
    assert main(["eval", str(tmp_path / "no-model"), "--task", "passkey", "--out", str(result)]) == 2
    assert "hf-fam eval draws its plot with matplotlib" in capsys.readouterr().err
    assert not result.exists()
    # --no-plot: the JSON alone, without matplotlib
    from hf_fam.tiny import make_tiny_checkpoint

    model = make_tiny_checkpoint(tmp_path / "tiny", "llama")
    assert main(["eval", str(model), "--task", "passkey", "--form", "synthetic", "--lengths", "32", "--trials", "2",
                 "--block-size", "8", "--memory-segments", "1", "--fam-length", "2", "--out", str(result),
                 "--no-plot"]) == 0
    assert result.is_file() and not result.with_suffix(".png").exists()
    assert capsys.readouterr().out.strip().endswith(f"wrote {result}")


def test_demo_saves_what_it_computed_before_plotting(tmp_path, monkeypatch):
    """The plot is drawn last: when it fails, results.json and the trained checkpoint are already on disk."""
    import pytest

    import hf_fam.evaluation

    def broken_plot(*args, **kwargs):
        raise RuntimeError("plotting failed")

    monkeypatch.setattr(hf_fam.evaluation, "plot_passkey", broken_plot)
    out = tmp_path / "demo"
    with pytest.raises(RuntimeError, match="plotting failed"):
        main(["demo", "--out", str(out), "--steps", "2", "--trials", "4", "--sequential", "--pretrain-steps", "4",
              "--eval-multiples", "1"])
    assert json.loads((out / "results.json").read_text())["runs"]["FAM"]["history"]["steps"] == 2
    assert (out / "fam-passkey-model" / "config.json").exists()
    assert (out / "fam-passkey-model" / "README.md").exists()
