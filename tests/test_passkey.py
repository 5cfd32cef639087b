"""The synthetic passkey task: both forms, loss on the answer only, deterministic, and what evaluation needs."""

from __future__ import annotations

import pytest
import torch

from hf_fam.tasks.passkey import PASSKEY_INTRO, passkey_examples
from hf_fam.tiny import byte_tokenizer
from hf_fam.training import PasskeyConfig, SyntheticPasskeyVocab, beyond_reach, passkey_dataset, passkey_exact_match


@pytest.fixture(scope="module")
def tokenizer():
    return byte_tokenizer()


def _check_common(ex, key_text):
    ids, labels = ex["input_ids"], ex["labels"]
    assert len(ids) == len(labels) == ex["seq_len"]
    p = ex["prompt_length"]
    assert all(label == -100 for label in labels[:p]), "loss on the answer only"
    assert labels[p:] == ids[p:] and p < len(ids)
    assert 0 <= ex["key_position"] < ex["key_end"] <= p
    assert len(ex["passkey"]) == 5 and ex["passkey"].isdigit()
    assert key_text(ids[ex["key_position"]:ex["key_end"]]).count(ex["passkey"]) >= 1
    assert ex["passkey"] in key_text(ids[p:])


def test_text_form(tokenizer):
    config = PasskeyConfig(num_examples=6, seq_len=300, form="text", seed=3)
    examples = list(passkey_examples(config, tokenizer))
    for ex in examples:
        _check_common(ex, tokenizer.decode)
        assert 300 - 25 < ex["seq_len"] <= 300  # whole filler sentences, at most seq_len
        text = tokenizer.decode(ex["input_ids"])
        assert text.startswith(PASSKEY_INTRO)
        assert f"The pass key is {ex['passkey']}. Remember it. {ex['passkey']} is the pass key." in text
        assert text.endswith(f"What is the pass key? The pass key is {ex['passkey']}")
        assert "The grass is green." in text
        assert tokenizer.decode(ex["input_ids"][ex["prompt_length"]:]) == f" {ex['passkey']}"
    assert len({ex["passkey"] for ex in examples}) > 1


def test_synthetic_form():
    vocab = SyntheticPasskeyVocab()
    assert vocab.size == 33 and (vocab.key, vocab.end_key, vocab.query) == (30, 31, 32) and len(vocab.filler) == 20
    config = PasskeyConfig(num_examples=6, seq_len=64, form="synthetic", seed=3)
    for ex in passkey_examples(config):
        _check_common(ex, lambda ids: "".join(vocab.decode(ids).split()))
        ids = ex["input_ids"]
        assert ex["seq_len"] == 64 and max(ids) < 33
        assert vocab.decode(ids[ex["key_position"]:ex["key_end"]]) == "KEY " + " ".join(ex["passkey"]) + " ENDK"
        assert vocab.decode(ids[ex["prompt_length"] - 1:]) == "QRY " + " ".join(ex["passkey"])
        assert sum(ex["labels"][i] != -100 for i in range(64)) == 5
    shifted = next(passkey_examples(PasskeyConfig(num_examples=1, seq_len=64, form="synthetic", vocab_offset=50)))
    assert min(shifted["input_ids"]) >= 50 and SyntheticPasskeyVocab(50).size == 83


@pytest.mark.parametrize("form", ["text", "synthetic"])
def test_depth_places_the_key(form, tokenizer):
    positions = []
    for depth in (0.0, 0.5, 1.0):
        ex = next(passkey_examples(PasskeyConfig(num_examples=1, seq_len=400, depth=depth, form=form), tokenizer))
        positions.append(ex["key_position"])
        assert abs(ex["depth"] - depth) < 0.05
    assert positions[0] < positions[1] < positions[2]
    if form == "synthetic":
        assert positions[0] == 0  # right at the start (the paper's placement)
    ex = next(passkey_examples(PasskeyConfig(num_examples=1, seq_len=400, depth=1.0, form=form), tokenizer))
    assert ex["prompt_length"] - ex["key_end"] < 40  # just before the question


@pytest.mark.parametrize("form", ["text", "synthetic"])
def test_deterministic_for_a_seed_and_per_index(form, tokenizer):
    lengths = dict(seq_len=500, min_seq_len=300)
    config = PasskeyConfig(num_examples=5, form=form, seed=7, **lengths)
    a = passkey_dataset(config, tokenizer)
    b = passkey_dataset(config, tokenizer)
    assert a.to_dict() == b.to_dict()
    assert len(set(a["seq_len"])) > 1 and min(a["seq_len"]) >= 300 - 25  # random lengths in [min_seq_len, seq_len]
    fourth = next(passkey_examples(config, tokenizer, indices=[3]))
    assert fourth["input_ids"] == a[3]["input_ids"]  # example i does not depend on the others
    other = passkey_dataset(PasskeyConfig(num_examples=5, form=form, seed=8, **lengths), tokenizer)
    assert other["input_ids"] != a["input_ids"]
    assert set(a.column_names) == {"input_ids", "labels", "key_position", "key_end", "prompt_length", "seq_len",
                                   "passkey", "depth"}


def test_beyond_reach():
    # C = 4, M = 1, L = 2: from the question's block q, BSWA reaches blocks q-2 .. q
    kw = dict(block_size=4, memory_segments=1, num_layers=2)
    assert beyond_reach(key_end=4, prompt_length=13, **kw)  # key ends in block 0, question token 12 in block 3
    assert not beyond_reach(key_end=4, prompt_length=12, **kw)  # question token 11: block 2
    assert not beyond_reach(key_end=5, prompt_length=13, **kw)  # key ends in block 1
    assert beyond_reach(key_end=4, prompt_length=5, block_size=4, memory_segments=0, num_layers=2)  # own block only
    ex = next(passkey_examples(PasskeyConfig(num_examples=1, seq_len=256, depth=0.0, form="synthetic")))
    assert beyond_reach(ex["key_end"], ex["prompt_length"], **kw)
    assert not beyond_reach(ex["key_end"], ex["prompt_length"], block_size=128, memory_segments=1, num_layers=2)


def test_exact_match_scores_the_answer_only():
    labels = torch.tensor([[-100, -100, 7, 8], [-100, -100, 7, 8]])
    logits = torch.zeros(2, 4, 10)
    logits[0, 1, 7] = logits[0, 2, 8] = 1.0  # row 0 right
    logits[1, 1, 7] = logits[1, 2, 3] = 1.0  # row 1 second digit wrong
    logits[:, 0, 9] = 5.0  # wrong prediction on a non-answer position is ignored
    assert passkey_exact_match(logits, labels).tolist() == [True, False]


def test_bad_configs(tokenizer):
    with pytest.raises(ValueError, match="depth must be in \\[0, 1\\]"):
        PasskeyConfig(depth=1.5)
    with pytest.raises(ValueError, match="form must be one of text, synthetic, got 'audio'"):
        PasskeyConfig(form="audio")
    with pytest.raises(ValueError, match="min_seq_len must be an integer in \\[1, seq_len=10\\]"):
        PasskeyConfig(seq_len=10, min_seq_len=20)
    with pytest.raises(ValueError, match="synthetic passkey examples need seq_len >= 13"):
        PasskeyConfig(seq_len=12, form="synthetic")
    with pytest.raises(ValueError, match="needs a tokenizer"):
        list(passkey_examples(PasskeyConfig(num_examples=1, form="text")))
    with pytest.raises(ValueError, match=r"seq_len 50 is too short for the text passkey .* --seq-len \d+ or more"):
        list(passkey_examples(PasskeyConfig(num_examples=1, seq_len=50), tokenizer))
