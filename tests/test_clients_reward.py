"""Heads FAM has not: a FAM checkpoint has a causal LM head (`AutoModelForCausalLM`) and its backbone
(`AutoModel`), nothing else. A sequence-classification load, which TRL's `RewardTrainer` makes from a path, is
refused loudly by transformers, never served by a model that skips the memory."""

from __future__ import annotations

import pytest
import torch
from client_helpers import fam_checkpoint
from datasets import Dataset
from transformers import AutoModelForSequenceClassification, AutoModelForTokenClassification, AutoTokenizer

trl = pytest.importorskip("trl")

REFUSED = "Unrecognized configuration class"


@pytest.fixture(scope="module")
def fam_folder(tmp_path_factory):
    return fam_checkpoint(tmp_path_factory.mktemp("heads") / "fam")


@pytest.mark.parametrize("auto", [AutoModelForSequenceClassification, AutoModelForTokenClassification])
def test_a_classification_head_is_refused(fam_folder, auto):
    with pytest.raises(ValueError, match=REFUSED):
        auto.from_pretrained(fam_folder, trust_remote_code=True, dtype=torch.float32)


def test_reward_trainer_refuses_a_fam_checkpoint(fam_folder, tmp_path):
    pairs = Dataset.from_dict({"chosen": ["a helpful answer"] * 2, "rejected": ["no"] * 2})
    config = trl.RewardConfig(output_dir=str(tmp_path / "out"), max_steps=1, report_to=[], use_cpu=True, bf16=False,
                              save_strategy="no", model_init_kwargs={"trust_remote_code": True})
    with pytest.raises(ValueError, match=REFUSED):
        trl.RewardTrainer(model=str(fam_folder), args=config, train_dataset=pairs,
                          processing_class=AutoTokenizer.from_pretrained(fam_folder))
