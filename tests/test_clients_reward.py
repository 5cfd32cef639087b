"""Sequence classifiers from a FAM checkpoint, as the clients make them: TRL's `RewardTrainer` and transformers'
text-classification pipeline load `AutoModelForSequenceClassification` from the path, and get a
FAMForSequenceClassification whose rewards are FAM's (each row's own, alone, padding cut off), never a plain
classifier's. (Token classifiers and their pipeline: tests/test_token_classification.py.)"""

from __future__ import annotations

import pytest
import torch
from client_helpers import base_folder, fam_checkpoint
from conftest import assert_close
from datasets import Dataset
from transformers import AutoModelForSequenceClassification, AutoTokenizer, pipeline

from hf_fam import FAMForSequenceClassification

trl = pytest.importorskip("trl")

LONG = "a feedback attention memory reads long input block by block and keeps what matters " * 2
PAIRS = {"chosen": [LONG, "pack my box with five dozen liquor jugs, said the sphinx"],
         "rejected": ["no", "how vexingly quick daft zebras jump over the five boxing wizards"]}


@pytest.fixture(scope="module")
def fam_folder(tmp_path_factory):
    return fam_checkpoint(tmp_path_factory.mktemp("heads") / "fam")


def _rewards_alone(model, tokenizer, texts):
    """Each text's reward, read alone (no padding), as the trainer's collator ends it (EOS appended)."""
    with torch.no_grad():
        return torch.cat([model(torch.tensor([tokenizer(t)["input_ids"] + [tokenizer.eos_token_id]])).logits
                          for t in texts]).squeeze(-1)


def test_reward_trainer_trains_a_fam_reward_model_from_its_path(fam_folder, tmp_path):
    tokenizer = AutoTokenizer.from_pretrained(fam_folder)
    config = trl.RewardConfig(output_dir=str(tmp_path / "out"), max_steps=2, report_to=[], use_cpu=True, bf16=False,
                              save_strategy="no", per_device_train_batch_size=2, learning_rate=1e-3, seed=0,
                              model_init_kwargs={"trust_remote_code": True, "dtype": torch.float32})
    trainer = trl.RewardTrainer(model=str(fam_folder), args=config, train_dataset=Dataset.from_dict(PAIRS),
                                processing_class=tokenizer)
    model = trainer.model
    assert isinstance(model, FAMForSequenceClassification) and model.config.num_labels == 1

    # the loss the trainer optimises is built from FAM's rewards, each row's alone
    batch = next(iter(trainer.get_train_dataloader()))
    model.eval()
    with torch.no_grad():
        loss = trainer.compute_loss(model, dict(batch))
    chosen, rejected = (_rewards_alone(model, tokenizer, PAIRS[k]) for k in ("chosen", "rejected"))
    assert_close(loss, -torch.nn.functional.logsigmoid(chosen - rejected).mean(), msg="trainer loss")
    # and not a plain classifier's: the same weights without FAM score the long text otherwise
    plain = AutoModelForSequenceClassification.from_pretrained(base_folder(fam_folder), num_labels=1,
                                                               dtype=torch.float32).eval()
    plain.score.load_state_dict(model.score.state_dict())
    assert (_rewards_alone(plain, tokenizer, [LONG]) - chosen[0]).abs().item() > 1e-3

    fam_before = model.fam.fam_init.detach().clone()
    model.train()
    trainer.train()
    assert (model.fam.fam_init - fam_before).abs().max() > 0  # the memory trains with the reward
    trainer.save_model(str(tmp_path / "reward"))
    loaded = AutoModelForSequenceClassification.from_pretrained(tmp_path / "reward", trust_remote_code=True,
                                                                dtype=torch.float32).eval()
    assert isinstance(loaded, FAMForSequenceClassification)
    assert_close(_rewards_alone(loaded, tokenizer, [LONG]), _rewards_alone(model.eval(), tokenizer, [LONG]),
                 msg="saved = loaded")


def test_the_text_classification_pipeline_runs_fam(fam_folder, tmp_path):
    labels = {0: "off-topic", 1: "on-topic"}
    AutoModelForSequenceClassification.from_pretrained(fam_folder, id2label=labels).save_pretrained(tmp_path / "cls")
    AutoTokenizer.from_pretrained(fam_folder).save_pretrained(tmp_path / "cls")
    classify = pipeline("text-classification", model=str(tmp_path / "cls"), trust_remote_code=True, top_k=None,
                        function_to_apply="none", dtype=torch.float32)
    assert isinstance(classify.model, FAMForSequenceClassification)
    texts = [LONG, "short"]
    got = classify(texts, batch_size=2)  # one padded batch
    tokenizer = classify.tokenizer
    with torch.no_grad():
        for text, scores in zip(texts, got):
            expected = classify.model(**tokenizer(text, return_tensors="pt")).logits[0]
            by_label = {s["label"]: s["score"] for s in scores}
            assert_close(torch.tensor([by_label[labels[i]] for i in range(2)]), expected, msg=text[:20])
