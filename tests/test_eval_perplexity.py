"""`hf-fam eval --task perplexity --compare base bswa fam`: the same text, the same weights, three attention
patterns, one JSON and a plot of perplexity against position."""

from __future__ import annotations

import json
import math

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import hf_fam
from hf_fam.cli import main
from hf_fam.tiny import make_tiny_checkpoint


def direct_perplexity(model, ids: torch.Tensor) -> float:
    with torch.no_grad():
        logits = model(ids[None]).logits[0, :-1]
    return math.exp(torch.nn.functional.cross_entropy(logits.float(), ids[1:]).item())


@pytest.mark.parametrize("max_tokens", [150, None])
def test_compare_writes_three_curves_and_matches_direct_runs(tmp_path, capsys, max_tokens):
    """With --max-tokens, and without: the whole text, its full attention one block as long as the text (a block
    of 2**31 tokens, the earlier bound, asked for 17 GB)."""
    src = make_tiny_checkpoint(tmp_path / "base", "llama")
    text = tmp_path / "text.txt"
    text.write_text(" ".join(f"word{i % 37} and more {i}" for i in range(60)))
    out = tmp_path / "ppl.json"
    limit = ["--max-tokens", str(max_tokens)] if max_tokens else []
    code = main(["eval", str(src), "--task", "perplexity", "--text-file", str(text), "--compare", "base", "bswa",
                 "fam", "--block-size", "16", "--memory-segments", "1", "--fam-length", "4", *limit,
                 "--chunk-tokens", "40", "--out", str(out), "--dtype", "float32"])
    assert code == 0, capsys.readouterr().err
    result = json.loads(out.read_text())
    names = list(result["models"])
    assert names == ["base (full attention)", "BSWA C=16 M=1", "FAM C=16 M=1 F=4"]
    assert out.with_suffix(".png").stat().st_size > 1000

    tokenizer = AutoTokenizer.from_pretrained(src)
    ids = torch.tensor([tokenizer.bos_token_id] + tokenizer(text.read_text(), add_special_tokens=False)["input_ids"])
    ids = ids[:max_tokens]
    assert result["models"]["base (full attention)"]["tokens"] == len(ids) > (0 if max_tokens else 150)
    base = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
    expected_base = direct_perplexity(base, ids)
    bswa = hf_fam.FAMForCausalLM.from_base_model(base, block_size=16, memory_segments=1, fam_length=0).eval()
    expected_bswa = direct_perplexity(bswa, ids)
    assert math.isclose(result["models"]["base (full attention)"]["perplexity"], expected_base, rel_tol=1e-4)
    assert math.isclose(result["models"]["BSWA C=16 M=1"]["perplexity"], expected_bswa, rel_tol=1e-4)
    assert abs(expected_base - expected_bswa) > 1e-3  # the two runs differ, so the comparison means something
