"""`pipeline("text-generation", model=DIR, trust_remote_code=True)` on a FAM checkpoint: a batch of prompts of
different lengths, padded together, generates (greedy) exactly what each prompt generates alone, and what the
FAM model's own `generate` gives."""

from __future__ import annotations

import pytest
import torch
from client_helpers import fam_checkpoint
from transformers import AutoModelForCausalLM, AutoTokenizer, pipeline

PROMPTS = [
    "the quick brown fox jumps over the lazy dog and keeps running far",
    "hi",
    "a feedback attention memory reads long input block by block, then",
]
NEW = 8


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return fam_checkpoint(tmp_path_factory.mktemp("pipe") / "fam", route="converted")


def _token_ids(outputs):
    return [out[0]["generated_token_ids"] for out in outputs]


def test_batched_pipeline_equals_one_prompt_at_a_time(folder):
    generator = pipeline("text-generation", model=str(folder), trust_remote_code=True, dtype=torch.float32)
    assert type(generator.model).__name__ == "FAMForCausalLM"
    assert generator.tokenizer.padding_side == "left"
    kwargs = dict(max_new_tokens=NEW, min_new_tokens=NEW, do_sample=False, return_tensors=True)
    alone = _token_ids([generator(p, **kwargs) for p in PROMPTS])
    batched = _token_ids(generator(PROMPTS, batch_size=len(PROMPTS), **kwargs))
    pad = generator.tokenizer.pad_token_id
    for row, one in zip(batched, alone):
        # a batched row keeps its left padding
        assert row[len(row) - len(one):] == one and set(row[: len(row) - len(one)]) <= {pad}
    # and what the model's own generate gives
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    for prompt, ids in zip(PROMPTS[:1], alone):
        enc = tokenizer(prompt, return_tensors="pt")
        out = model.generate(**enc, max_new_tokens=NEW, min_new_tokens=NEW, do_sample=False,
                             pad_token_id=tokenizer.pad_token_id)
        assert out[0].tolist() == ids
    # the prompts are longer than FAM's window (16 tokens) and padded in the batch: the test can tell padding
    # handled wrongly from right
    lengths = [len(tokenizer(p).input_ids) for p in PROMPTS]
    assert max(lengths) > 3 * 16 and min(lengths) < 8, lengths
