"""FAMForSequenceClassification: the family's own sequence-classification head (the score of each row's last token
that is not padding) on a FAM backbone. Exact against the FAM reference and, with FAM off, against the unmodified
classifier; loaded from a FAM causal LM checkpoint, saved = loaded, as remote code, and with LoRA."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from client_helpers import card_snippet_logits, check_classifier_lora, fam_checkpoint
from conftest import assert_close, padding_mask, random_ids, tiny_model
from fam_reference import reference_fam_logits
from torch import nn
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

import hf_fam
from hf_fam import FAMForSequenceClassification
from hf_fam.checkpoint_io.inspection import inspect_checkpoint, verify_checkpoint

SETTINGS = dict(block_size=4, memory_segments=1, fam_length=3, fam_update="paper")
PAD = 0


def tiny_classifier(family: str, num_labels: int = 3, pad_token_id: int | None = PAD) -> nn.Module:
    """The family's sequence classifier with the decoder weights of `tiny_model(family)` and a random score."""
    lm = tiny_model(family)
    config = copy.deepcopy(lm.config)
    config.num_labels, config.pad_token_id = num_labels, pad_token_id
    classifier = AutoModelForSequenceClassification.from_config(config)
    classifier.model.load_state_dict(lm.model.state_dict())
    torch.manual_seed(1)
    nn.init.normal_(classifier.score.weight, std=1.0)
    return classifier.eval()


def padded_ids(lengths: list[int], total: int, side: str, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids without the padding id in real positions, the padding id elsewhere, and their mask."""
    mask = padding_mask(lengths, total, side)
    ids = random_ids(len(lengths), total, seed=seed).clamp(min=1) * mask + PAD * (1 - mask)
    return ids, mask


def last_real(mask: torch.Tensor) -> torch.Tensor:
    return (torch.arange(mask.shape[1]) * mask).argmax(-1)


@pytest.mark.parametrize("side", ["right", "left"])
def test_fam_off_is_the_unmodified_classifier(family, side):
    base = tiny_classifier(family)
    ids, mask = padded_ids([21, 13, 4], 21, side)
    position_ids = (mask.cumsum(1) - 1).clamp(min=0)  # positions counted from each row's first real token
    with torch.no_grad():
        expected = base(ids, attention_mask=mask, position_ids=position_ids).logits
        model = FAMForSequenceClassification.from_base_model(base, block_size=7, memory_segments=2, fam_length=0)
        got = model.eval()(ids, attention_mask=mask).logits
    assert_close(got, expected, msg=f"{family} {side} padding")


@pytest.mark.parametrize("side", ["right", "left"])
def test_fam_scores_the_reference_at_each_rows_last_token(family, side):
    base = tiny_classifier(family)
    model = FAMForSequenceClassification.from_base_model(base, **SETTINGS).eval()
    ids, mask = padded_ids([25, 17, 8, 1], 25, side, seed=4)
    with torch.no_grad():
        out = model(ids, attention_mask=mask)
        base.lm_head = base.score  # the reference applies `lm_head` to the final norm's output
        scores = reference_fam_logits(base, ids, mask, 4, 1, 3, model.fam.fam_init)
        plain = base(ids, attention_mask=mask).logits
    expected = scores[torch.arange(len(ids)), last_real(mask)]
    assert_close(out.logits, expected, msg=f"{family} {side}")
    assert len(out.fam_state) == model.config.num_hidden_layers
    assert (out.logits[0] - plain[0]).abs().max() > 1e-3  # FAM runs: the window (8) is far shorter than the row


def test_a_fam_causal_lm_checkpoint_starts_a_classifier_and_saves_as_one(tmp_path):
    folder = fam_checkpoint(tmp_path / "fam-lm")  # FAM weights far from zero, its tokenizer (padding id 0)
    lm = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    labels = {0: "negative", 1: "neutral", 2: "positive"}
    model = AutoModelForSequenceClassification.from_pretrained(folder, id2label=labels, dtype=torch.float32).eval()
    assert isinstance(model, FAMForSequenceClassification) and model.config.num_labels == 3
    assert model.score.out_features == 3
    ids, mask = padded_ids([19, 11], 19, "left", seed=2)
    with torch.no_grad():
        out = model(ids, attention_mask=mask, labels=torch.tensor([2, 0]))
        hidden = lm.model(ids, attention_mask=mask).last_hidden_state
    assert_close(out.logits, model.score(hidden)[:, -1], msg="the causal LM's backbone, FAM weights and all")
    assert model.config.problem_type == "single_label_classification"  # set by the family's loss, on our config
    assert_close(out.loss, nn.functional.cross_entropy(out.logits, torch.tensor([2, 0])))

    model.save_pretrained(tmp_path / "classifier")
    saved = json.loads((tmp_path / "classifier" / "config.json").read_text())
    assert saved["auto_map"]["AutoModelForSequenceClassification"] == "modeling_fam.FAMForSequenceClassification"
    assert saved["id2label"] == {"0": "negative", "1": "neutral", "2": "positive"}
    assert verify_checkpoint(tmp_path / "classifier") == []  # score and labels expected, no lm_head
    assert inspect_checkpoint(tmp_path / "classifier").summary.head == "sequence classifier (3 labels)"
    loaded = AutoModelForSequenceClassification.from_pretrained(tmp_path / "classifier", dtype=torch.float32).eval()
    with torch.no_grad():
        again = loaded(ids, attention_mask=mask).logits
    assert_close(again, out.logits, msg="saved = loaded")
    assert loaded.config.problem_type == "single_label_classification" and loaded.config.id2label == labels

    # where hf_fam is not installed: the checkpoint's own code, loaded by its model card's snippet
    card, remote_class, remote = card_snippet_logits(tmp_path / "classifier", folder,
                                                     {"input_ids": ids, "attention_mask": mask}, tmp_path)
    assert "pipeline_tag: text-classification" in card
    assert "model = AutoModelForSequenceClassification.from_pretrained(model_id, trust_remote_code=True)" in card
    assert remote_class == "FAMForSequenceClassification"
    assert_close(remote, out.logits, msg="remote code")


def test_a_wrapped_classifier_keeps_its_labels_and_reward_models_regress():
    base = tiny_classifier("llama", num_labels=1)
    base.config.id2label, base.config.label2id = {0: "reward"}, {"reward": 0}
    model = FAMForSequenceClassification.from_base_model(base, **SETTINGS)
    assert model.config.id2label == {0: "reward"} and model.config.num_labels == 1
    ids, mask = padded_ids([14, 9], 14, "right", seed=3)
    target = torch.tensor([0.5, -1.0])
    out = model.eval()(ids, attention_mask=mask, labels=target)
    assert model.config.problem_type == "regression"
    assert_close(out.loss, nn.functional.mse_loss(out.logits.squeeze(-1), target))


def test_a_padding_token_set_on_the_config_reaches_the_head():
    """The family pools at the last token that is not `pad_token_id`, read from the base config: setting it on the
    FAM config (as TRL and most recipes do) must reach there, or padded rows would be scored at a padding token."""
    model = FAMForSequenceClassification.from_base_model(tiny_classifier("llama", pad_token_id=None), **SETTINGS).eval()
    ids, mask = padded_ids([15, 6], 15, "right", seed=5)
    with pytest.raises(ValueError, match="no padding token"):
        model(ids, attention_mask=mask)
    model.config.pad_token_id = PAD
    with torch.no_grad():
        batched = model(ids, attention_mask=mask).logits
        alone = torch.cat([model(ids[b : b + 1, :n]).logits for b, n in enumerate([15, 6])])
    assert_close(batched, alone, msg="padded rows = rows alone")


def test_loss_chunking_is_refused():
    model = FAMForSequenceClassification.from_base_model(tiny_classifier("llama"), **SETTINGS)
    with pytest.raises(ValueError, match="fam_loss_chunk"):
        model(random_ids(1, 9).clamp(min=1), labels=torch.tensor([1]), fam_loss_chunk=4)


def test_lora_trains_the_score_merges_and_reloads(tmp_path):
    pytest.importorskip("peft")
    FAMForSequenceClassification.from_base_model(tiny_classifier("llama"), **SETTINGS).save_pretrained(tmp_path / "c")
    ids, mask = padded_ids([18, 7], 18, "left", seed=6)
    merged = check_classifier_lora(tmp_path / "c", AutoModelForSequenceClassification, "SEQ_CLS",
                                   {"input_ids": ids, "attention_mask": mask}, torch.tensor([0, 2]), tmp_path)
    assert isinstance(merged, FAMForSequenceClassification)


def test_a_head_of_the_other_kind_is_refused():
    """A causal LM wrapped as a classifier would return vocabulary logits as scores, and the other way round."""
    with pytest.raises(TypeError, match="wraps a sequence classifier .* got LlamaForCausalLM"):
        FAMForSequenceClassification.from_base_model(tiny_model("llama"), **SETTINGS)
    with pytest.raises(TypeError, match="wraps a causal LM .* got LlamaForSequenceClassification"):
        hf_fam.FAMForCausalLM.from_base_model(tiny_classifier("llama"), **SETTINGS)
    with pytest.raises(TypeError, match=r"hf_fam.patch expects a causal LM \(with `lm_head`\), a sequence classifier"):
        hf_fam.patch(tiny_model("llama").model, **SETTINGS)  # a bare decoder stack


def test_a_patched_classifier_is_the_wrapped_one_and_saves_as_one(tmp_path):
    """`hf_fam.patch` on a loaded classifier (a reward model): the same scores as FAMForSequenceClassification
    wrapping it, its labels kept; it saves a classifier checkpoint, and `unpatch` gives the plain one back."""
    base = tiny_classifier("llama")
    base.config.id2label, base.config.label2id = {0: "a", 1: "b", 2: "c"}, {"a": 0, "b": 1, "c": 2}
    ids, mask = padded_ids([23, 12], 23, "left", seed=7)
    with torch.no_grad():
        plain = base(ids, attention_mask=mask).logits
        patched = hf_fam.patch(base, **SETTINGS, fam_init="random")
        got = patched(ids, attention_mask=mask)
        wrapped = FAMForSequenceClassification.from_base_model(tiny_classifier("llama"), **SETTINGS,
                                                              fam_init=patched.fam.fam_init).eval()
        assert_close(got.logits, wrapped(ids, attention_mask=mask).logits, atol=0.0)
    assert len(got.fam_state) == 2 and (got.logits - plain).abs().max() > 1e-3
    from hf_fam.training.lora import fam_lora_config

    assert fam_lora_config(patched, r=2).task_type == "SEQ_CLS"  # PEFT then saves its score with the adapter
    patched.save_pretrained(tmp_path / "patched")
    loaded = AutoModelForSequenceClassification.from_pretrained(tmp_path / "patched", dtype=torch.float32).eval()
    assert isinstance(loaded, FAMForSequenceClassification) and loaded.config.id2label == {0: "a", 1: "b", 2: "c"}
    with torch.no_grad():
        assert_close(loaded(ids, attention_mask=mask).logits, got.logits, msg="saved = loaded")
        assert_close(hf_fam.unpatch(patched)(ids, attention_mask=mask).logits, plain, atol=0.0)
