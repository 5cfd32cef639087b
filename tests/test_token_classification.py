"""FAMForTokenClassification: the family's token-classification head (a score for every token) on a FAM backbone.
Exact against the FAM reference at every token and, with FAM off, against the unmodified classifier; streamed
through a FAMCache chunk by chunk = at once; loaded from a FAM causal LM checkpoint, saved = loaded, as remote code,
through the token-classification pipeline, patched, and with LoRA (merged = unmerged = reloaded)."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from client_helpers import card_snippet_logits, check_classifier_lora, fam_checkpoint
from conftest import assert_close, load_script, padding_mask, random_ids, tiny_model
from fam_reference import reference_fam_logits
from torch import nn
from transformers import AutoModelForCausalLM, AutoModelForTokenClassification, pipeline

import hf_fam
from hf_fam import FAMCache, FAMForSequenceClassification, FAMForTokenClassification
from hf_fam.checkpoint_io.inspection import inspect_checkpoint, verify_checkpoint

SETTINGS = dict(block_size=4, memory_segments=1, fam_length=3, fam_update="paper")
LABELS = {0: "O", 1: "B-X", 2: "I-X"}


def tiny_tagger(family: str = "llama", num_labels: int = 3, kind=AutoModelForTokenClassification) -> nn.Module:
    """The family's token classifier (or another head of `kind`) with the decoder weights of `tiny_model(family)`
    and a random score."""
    lm = tiny_model(family)
    config = copy.deepcopy(lm.config)
    config.num_labels, config.pad_token_id = num_labels, 0
    tagger = kind.from_config(config)
    tagger.model.load_state_dict(lm.model.state_dict())
    torch.manual_seed(1)
    nn.init.normal_(tagger.score.weight, std=0.3)  # scores of a few units, as a trained head gives
    return tagger.eval()


@pytest.mark.parametrize("side", ["right", "left"])
def test_fam_off_is_the_unmodified_token_classifier(family, side):
    base = tiny_tagger(family)
    ids, mask = random_ids(3, 21, seed=1), padding_mask([21, 13, 4], 21, side)
    position_ids = (mask.cumsum(1) - 1).clamp(min=0)  # positions counted from each row's first real token
    with torch.no_grad():
        expected = base(ids, attention_mask=mask, position_ids=position_ids).logits
        model = FAMForTokenClassification.from_base_model(base, block_size=7, memory_segments=2, fam_length=0)
        got = model(ids, attention_mask=mask).logits
    assert_close(got, expected, mask=mask, msg=f"{family} {side} padding")


@pytest.mark.parametrize("side", ["right", "left"])
def test_fam_scores_every_token_as_the_reference(family, side):
    base = tiny_tagger(family)
    model = FAMForTokenClassification.from_base_model(base, **SETTINGS)
    ids, mask = random_ids(3, 25, seed=4), padding_mask([25, 17, 8], 25, side)
    with torch.no_grad():
        out = model(ids, attention_mask=mask)
        base.lm_head = base.score  # the reference applies `lm_head` to the final norm's output
        expected = reference_fam_logits(base, ids, mask, 4, 1, 3, model.fam.fam_init)
        plain = base(ids, attention_mask=mask).logits
    assert out.logits.shape == (3, 25, 3)
    assert_close(out.logits, expected, mask=mask, msg=f"{family} {side}")
    assert (out.logits[0, 12:] - plain[0, 12:]).abs().max() > 1e-3  # FAM runs: the window (8) is far shorter


def test_a_long_document_streams_through_a_cache_at_constant_size():
    """Tagging a document longer than memory allows: chunk by chunk with one FAMCache (updated in place: the
    family's token-classification output has no cache field), the same scores as reading it at once."""
    model = FAMForTokenClassification.from_base_model(tiny_tagger(), **SETTINGS)
    ids = random_ids(2, 43, seed=5)
    with torch.no_grad():
        whole = model(ids).logits
        cache, pieces, sizes = FAMCache(model.fam_settings), [], []
        for start in range(0, 43, 6):
            pieces.append(model(ids[:, start : start + 6], cache=cache, use_cache=True).logits)
            sizes.append(cache.nbytes())
    assert_close(torch.cat(pieces, dim=1), whole, msg="streamed = at once")
    assert len(set(sizes)) == 1, sizes  # constant: fixed buffers from the first chunk


def test_a_fam_causal_lm_checkpoint_starts_a_token_classifier_and_saves_as_one(tmp_path):
    folder = fam_checkpoint(tmp_path / "fam-lm")  # FAM weights far from zero, its tokenizer (padding id 0)
    lm = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    model = AutoModelForTokenClassification.from_pretrained(folder, id2label=LABELS, dtype=torch.float32).eval()
    assert isinstance(model, FAMForTokenClassification) and model.config.num_labels == 3
    ids, mask = random_ids(2, 19, seed=2), padding_mask([19, 11], 19, "left")
    labels = torch.randint(0, 3, (2, 19), generator=torch.Generator().manual_seed(0)).masked_fill(mask == 0, -100)
    with torch.no_grad():
        out = model(ids, attention_mask=mask, labels=labels)
        hidden = lm.model(ids, attention_mask=mask).last_hidden_state
    assert_close(out.logits, model.score(hidden), mask=mask, msg="the causal LM's backbone, FAM weights and all")
    kept = labels != -100
    assert_close(out.loss, nn.functional.cross_entropy(out.logits[kept], labels[kept]))

    model.save_pretrained(tmp_path / "tagger")
    saved = json.loads((tmp_path / "tagger" / "config.json").read_text())
    assert saved["auto_map"]["AutoModelForTokenClassification"] == "modeling_fam.FAMForTokenClassification"
    assert saved["architectures"] == ["FAMForTokenClassification"] and saved["id2label"]["1"] == "B-X"
    assert verify_checkpoint(tmp_path / "tagger") == []  # score and labels expected, no lm_head
    assert inspect_checkpoint(tmp_path / "tagger").summary.head == "token classifier (3 labels)"
    loaded = AutoModelForTokenClassification.from_pretrained(tmp_path / "tagger", dtype=torch.float32).eval()
    with torch.no_grad():
        assert_close(loaded(ids, attention_mask=mask).logits, out.logits, mask=mask, msg="saved = loaded")

    # where hf_fam is not installed: the checkpoint's own code, loaded by its model card's snippet
    card, remote_class, remote = card_snippet_logits(tmp_path / "tagger", folder,
                                                     {"input_ids": ids, "attention_mask": mask}, tmp_path)
    assert "pipeline_tag: token-classification" in card
    assert "model = AutoModelForTokenClassification.from_pretrained(model_id, trust_remote_code=True)" in card
    assert remote_class == "FAMForTokenClassification"
    assert_close(remote, out.logits, mask=mask, msg="remote code")

    # the pipeline: each token's label and score from the FAM model's logits, in a padded batch
    tagger = pipeline("token-classification", model=str(tmp_path / "tagger"), trust_remote_code=True)
    assert type(tagger.model).__name__ == "FAMForTokenClassification"  # the local class, or the remote code (5.4)
    texts = [" ".join(f"w{i}" for i in range(40)), "w1 w2 w3"]
    got = tagger(texts, batch_size=2, ignore_labels=[])
    for text, entities in zip(texts, got):  # the second row left-padded in the batch: as read alone
        enc = tagger.tokenizer(text, return_tensors="pt")
        with torch.no_grad():
            probs = loaded(**enc).logits[0].softmax(-1)
        real = [i for i, t in enumerate(enc.input_ids[0].tolist()) if t not in tagger.tokenizer.all_special_ids]
        assert len(entities) == len(real) > 3
        for entity, i in zip(entities, real):
            assert entity["entity"] == LABELS[int(probs[i].argmax())]
            assert abs(entity["score"] - probs[i].max().item()) <= 1e-5


def test_lora_trains_the_score_merges_and_reloads(tmp_path):
    pytest.importorskip("peft")
    FAMForTokenClassification.from_base_model(tiny_tagger(), **SETTINGS).save_pretrained(tmp_path / "t")
    ids, mask = random_ids(2, 18, seed=6), padding_mask([18, 7], 18, "left")
    labels = torch.randint(0, 3, (2, 18), generator=torch.Generator().manual_seed(1))
    merged = check_classifier_lora(tmp_path / "t", AutoModelForTokenClassification, "TOKEN_CLS",
                                   {"input_ids": ids, "attention_mask": mask}, labels, tmp_path, logits_mask=mask)
    assert isinstance(merged, FAMForTokenClassification)


def test_a_patched_token_classifier_is_the_wrapped_one_and_saves_as_one(tmp_path):
    base = tiny_tagger()
    base.config.id2label, base.config.label2id = dict(LABELS), {v: k for k, v in LABELS.items()}
    ids, mask = random_ids(2, 23, seed=7), padding_mask([23, 12], 23, "left")
    with torch.no_grad():
        plain = base(ids, attention_mask=mask).logits
        patched = hf_fam.patch(base, **SETTINGS, fam_init="random")
        assert not patched.model.training  # the loaded model's mode is kept
        got = patched(ids, attention_mask=mask)
        wrapped = FAMForTokenClassification.from_base_model(tiny_tagger(), **SETTINGS, fam_init=patched.fam.fam_init)
        assert_close(got.logits, wrapped(ids, attention_mask=mask).logits, atol=0.0)
    assert len(got.fam_state) == 2 and (got.logits - plain).abs().max() > 1e-3
    from hf_fam.training.lora import fam_lora_config

    assert fam_lora_config(patched, r=2).task_type == "TOKEN_CLS"
    patched.save_pretrained(tmp_path / "patched")
    loaded = AutoModelForTokenClassification.from_pretrained(tmp_path / "patched", dtype=torch.float32).eval()
    assert isinstance(loaded, FAMForTokenClassification) and loaded.config.id2label == LABELS
    with torch.no_grad():
        assert_close(loaded(ids, attention_mask=mask).logits, got.logits, mask=mask, msg="saved = loaded")
        assert_close(hf_fam.unpatch(patched)(ids, attention_mask=mask).logits, plain, atol=0.0)


def test_the_two_classifier_heads_are_told_apart():
    """Both heads are a `score` layer: a sequence classifier wrapped as a token classifier would return one row of
    scores per token where one per sequence is meant, and the other way round. The class decides."""
    from transformers import AutoModelForSequenceClassification

    with pytest.raises(TypeError, match="wraps a token classifier .* got LlamaForSequenceClassification"):
        FAMForTokenClassification.from_base_model(tiny_tagger(kind=AutoModelForSequenceClassification), **SETTINGS)
    with pytest.raises(TypeError, match="wraps a sequence classifier .* got LlamaForTokenClassification"):
        FAMForSequenceClassification.from_base_model(tiny_tagger(), **SETTINGS)
    with pytest.raises(TypeError, match="wraps a token classifier .* got LlamaForCausalLM"):
        FAMForTokenClassification.from_base_model(tiny_model("llama"), **SETTINGS)
    patched = hf_fam.patch(tiny_tagger(kind=AutoModelForSequenceClassification), **SETTINGS)
    assert isinstance(patched.to_fam_model(), FAMForSequenceClassification)


def test_loss_chunking_is_refused():
    model = FAMForTokenClassification.from_base_model(tiny_tagger(), **SETTINGS)
    with pytest.raises(ValueError, match="fam_loss_chunk"):
        model(random_ids(1, 9), labels=torch.zeros(1, 9, dtype=torch.long), fam_loss_chunk=4)


def test_the_real_checkpoint_check_runs_on_a_tiny_one(tmp_path):
    """benchmarks/real_token_classification.py (docs/clients.md's figures on SmolLM2) on a tiny checkpoint."""
    check = load_script("benchmarks/real_token_classification.py")
    folder = fam_checkpoint(tmp_path / "fam")
    result = check.main(["--model", str(folder), "--words", "40", "--chunk", "7", "--out", str(tmp_path / "r.json")])
    assert result["tokens"] > 3 * result["window"] and result["settings"]["fam_update"] == "paper"
    assert result["streamed_vs_whole_max_abs"] <= 1e-5 and len(result["cache_bytes"]) == 1
    assert result["pipeline_batched_vs_alone_same_labels"]
    assert result["pipeline_batched_vs_alone_max_score_diff"] <= 1e-5
    assert json.loads((tmp_path / "r.json").read_text()) == result
