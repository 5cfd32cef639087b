"""A stream continued wrongly fails with one clear error, never silently."""

from __future__ import annotations

import pytest
import torch
from conftest import random_ids, tiny_model

import hf_fam


def fam_model(C=4, M=1, F=2, seed=0):
    return hf_fam.FAMForCausalLM.from_base_model(tiny_model("llama", seed=seed), block_size=C, memory_segments=M,
                                                 fam_length=F).eval()


def test_cache_of_another_model():
    a, b = fam_model(), fam_model(seed=1)
    cache = a(random_ids(1, 5), use_cache=True).cache
    with pytest.raises(ValueError, match="belongs to another model"):
        b(random_ids(1, 3), cache=cache, use_cache=True)


def test_cache_with_other_settings():
    a, b = fam_model(C=4), fam_model(C=5)
    cache = a(random_ids(1, 5), use_cache=True).cache
    with pytest.raises(ValueError, match="block_size=4.*block_size=5"):
        b(random_ids(1, 3), cache=cache, use_cache=True)


def test_cache_of_another_batch_size():
    model = fam_model()
    cache = model(random_ids(2, 5), use_cache=True).cache
    with pytest.raises(ValueError, match="holds 2 rows, the input has 1"):
        model(random_ids(1, 3), cache=cache, use_cache=True)


def test_non_fam_cache_with_content():
    from transformers import DynamicCache

    model = fam_model()
    cache = DynamicCache()
    cache.update(torch.zeros(1, 2, 3, 16), torch.zeros(1, 2, 3, 16), 0)
    with pytest.raises(ValueError, match="continues only a FAMCache"):
        model(random_ids(1, 3), cache=cache, use_cache=True)


def test_peft_prefix_tuning_is_refused_in_one_line():
    """Prefix tuning hands the model a cache of learned keys and values, which no FAM memory goes with."""
    from peft import PrefixTuningConfig, get_peft_model

    model = fam_model()
    config = model.config
    prefix = PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3, token_dim=config.hidden_size,
                                num_attention_heads=config.num_attention_heads, num_layers=config.num_hidden_layers)
    with pytest.raises(ValueError, match="PEFT prefix tuning's, have no FAM memory to continue: use LoRA"):
        get_peft_model(model, prefix)(input_ids=random_ids(1, 9))


def test_mismatched_attention_mask():
    model = fam_model()
    cache = model(random_ids(2, 6), attention_mask=torch.tensor([[1] * 6, [0, 0] + [1] * 4]), use_cache=True).cache
    with pytest.raises(ValueError, match="past columns do not match"):
        model(random_ids(2, 2), attention_mask=torch.ones(2, 8, dtype=torch.long), cache=cache, use_cache=True)
    with pytest.raises(ValueError, match=r"attention_mask has shape \(2, 5\)"):
        model(random_ids(2, 2), attention_mask=torch.ones(2, 5, dtype=torch.long), cache=cache, use_cache=True)


def test_positions_going_backwards_or_skipping():
    model = fam_model()
    cache = model(random_ids(1, 6), use_cache=True).cache
    with pytest.raises(ValueError,
                       match="go backwards in row 0: the stream's next position is 6, the chunk starts at 3"):
        model(random_ids(1, 2), position_ids=torch.tensor([[3, 4]]), cache=cache, use_cache=True)
    with pytest.raises(ValueError, match="skip ahead"):
        model(random_ids(1, 2), position_ids=torch.tensor([[9, 10]]), cache=cache, use_cache=True)
    with pytest.raises(ValueError, match="must be consecutive"):
        model(random_ids(1, 2), position_ids=torch.tensor([[6, 8]]), cache=cache, use_cache=True)
    model(random_ids(1, 2), position_ids=torch.tensor([[6, 7]]), cache=cache, use_cache=True)  # fine


def test_crop_is_refused():
    model = fam_model()
    cache = model(random_ids(1, 6), use_cache=True).cache
    with pytest.raises(NotImplementedError, match="cannot be rolled back"):
        cache.crop(2)
