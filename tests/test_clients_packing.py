"""Packed / padding-free batches (several documents in one row, as TRL's `padding_free=True` and `packing=True`
make them) are refused with one line by every FAM forward, instead of letting the memory run across documents;
rows that only concatenate documents with positions counting on (the paper's packing) run."""

from __future__ import annotations

import pytest
import torch
from conftest import random_ids, tiny_model

import hf_fam
from hf_fam.modeling.fam_packing import refuse_packed_inputs, restarting_rows


def _padding_free_batch():
    """What TRL's DataCollatorForLanguageModeling(padding_free=True) returns for documents of 7, 5 and 9 tokens."""
    lengths = [7, 5, 9]
    ids = random_ids(1, sum(lengths), seed=2, vocab=90) + 5
    position_ids = torch.cat([torch.arange(n) for n in lengths])[None]
    cu = torch.tensor([0, 7, 12, 21], dtype=torch.int32)
    return dict(input_ids=ids, position_ids=position_ids, cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=9,
                max_length_k=9)


def test_restarting_rows():
    pos = torch.tensor([[0, 1, 2, 3, 4], [0, 1, 2, 0, 1], [5, 6, 7, 8, 9]])
    assert restarting_rows(pos).tolist() == [False, True, False]
    # left padding (positions 1 on padding, as generate fills them) is not a restart
    padded = torch.tensor([[1, 1, 0, 1, 2]])
    assert restarting_rows(padded, torch.tensor([[0, 0, 1, 1, 1]])).tolist() == [False]
    assert restarting_rows(padded).tolist() == [True]


def test_refusal_names_the_sign_and_the_fix():
    batch = _padding_free_batch()
    with pytest.raises(ValueError, match="packed / padding-free") as info:
        refuse_packed_inputs(**{k: v for k, v in batch.items() if k != "input_ids"})
    assert "cu_seq_lens_q" in str(info.value) and "padding_free=False" in str(info.value)
    assert "\n" not in str(info.value)
    with pytest.raises(ValueError, match="position_ids restart inside row 0"):
        refuse_packed_inputs(position_ids=batch["position_ids"])
    refuse_packed_inputs(position_ids=torch.arange(21)[None] + 100)  # counting on: runs
    refuse_packed_inputs(position_ids=torch.tensor([[7]]))  # a decoding step
    refuse_packed_inputs()


@pytest.mark.parametrize("kind", ["FAMForCausalLM", "patched"])
@pytest.mark.parametrize("route", ["causal_lm", "backbone"])
def test_fam_forwards_refuse_a_padding_free_batch(kind, route):
    settings = dict(block_size=4, memory_segments=1, fam_length=3)
    if kind == "patched":
        model = hf_fam.patch(tiny_model("llama"), **settings)
    else:
        model = hf_fam.FAMForCausalLM.from_base_model(tiny_model("llama"), **settings)
    batch = _padding_free_batch()
    # "backbone" is the route TRL's fused LM head takes: model.base_model(...)
    forward = model if route == "causal_lm" else model.base_model
    for inputs in (batch, {"input_ids": batch["input_ids"], "position_ids": batch["position_ids"]}):
        with pytest.raises(ValueError, match="packed / padding-free"):
            forward(**inputs)
    # the same tokens as one document, positions counting on: runs
    forward(input_ids=batch["input_ids"], position_ids=torch.arange(21)[None])
