"""Training through the parallel schedule: gradients reach early tokens and fam_init through the memory."""

from __future__ import annotations

import torch
from conftest import assert_close, random_ids, tiny_model

import hf_fam
from hf_fam.modeling.fam_compat import checkpointing_call


def test_backward_reaches_early_tokens_and_fam_init(family):
    C, M, F, L = 4, 0, 2, 2
    model = hf_fam.FAMForCausalLM.from_base_model(tiny_model(family), block_size=C, memory_segments=M, fam_length=F)
    model.train()
    ids = random_ids(2, 24, seed=21)
    embeds = model.get_input_embeddings()(ids).detach().requires_grad_(True)
    out = model(inputs_embeds=embeds)
    beyond = C * (L * M + 1)
    # loss on the last block only: far beyond the attention window of the first block
    out.logits[:, -C:].sum().backward()
    assert embeds.grad[:, :C].abs().sum() > 0, "no gradient reached block 1 through the FAM"
    assert model.fam.fam_init.grad is not None and model.fam.fam_init.grad.abs().sum() > 0
    assert beyond < 24 - C


def test_without_fam_gradients_stop_at_the_window(family):
    C, M = 4, 0
    model = hf_fam.FAMForCausalLM.from_base_model(tiny_model(family), block_size=C, memory_segments=M, fam_length=0)
    ids = random_ids(1, 24, seed=22)
    embeds = model.get_input_embeddings()(ids).detach().requires_grad_(True)
    model(inputs_embeds=embeds).logits[:, -C:].sum().backward()
    assert embeds.grad[:, :-C].abs().sum() == 0


def test_loss_backward_with_labels(family):
    model = hf_fam.FAMForCausalLM.from_base_model(tiny_model(family), block_size=5, memory_segments=1, fam_length=3)
    model.train()
    ids = random_ids(2, 23, seed=23)
    loss = model(ids, labels=ids).loss
    loss.backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)


def test_reentrant_checkpointing_is_refused_with_a_clear_error():
    model = hf_fam.FAMForCausalLM.from_base_model(tiny_model("llama"), block_size=4, memory_segments=1, fam_length=2)
    model.train()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
    import pytest

    with pytest.raises(ValueError, match="non-reentrant gradient checkpointing") as refused:
        model(random_ids(1, 9), labels=random_ids(1, 9))
    fix = checkpointing_call()  # the installed transformers' name for the call
    assert fix in str(refused.value)
    model.gradient_checkpointing_disable()
    exec(fix, {"model": model})  # the named fix works
    model(random_ids(1, 9), labels=random_ids(1, 9)).loss.backward()


def test_checkpointing_kwargs_without_use_reentrant_run_non_reentrant():
    """Checkpointing kwargs that leave use_reentrant out (PEFT's prepare_model_for_kbit_training passes none) would
    get torch's reentrant variant, which fails in backward ("Trying to backward through the graph a second time"):
    FAM runs them non-reentrant, with the gradients of a model that does not checkpoint."""
    import warnings

    def grads(checkpointing_kwargs):
        torch.manual_seed(0)
        model = hf_fam.FAMForCausalLM.from_base_model(tiny_model("llama"), block_size=4, memory_segments=1,
                                                      fam_length=2)
        model.train()
        if checkpointing_kwargs is not None:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=checkpointing_kwargs)
        ids = random_ids(2, 13, seed=5)
        with warnings.catch_warnings():
            warnings.simplefilter("error", UserWarning)  # torch warns when checkpoint is called without the choice
            model(ids, labels=ids).loss.backward()
        return {name: p.grad for name, p in model.named_parameters() if p.requires_grad}

    plain, unstated = grads(None), grads({"preserve_rng_state": True})
    assert plain.keys() == unstated.keys()
    for name in plain:
        assert_close(unstated[name], plain[name], atol=1e-6, msg=name)


def test_training_forward_builds_no_cache_unless_asked():
    model = hf_fam.FAMForCausalLM.from_base_model(tiny_model("llama"), block_size=4, memory_segments=1, fam_length=2)
    ids = random_ids(1, 9)
    assert model.train()(ids).get("cache") is None
    assert model(ids, use_cache=True).cache is not None
    assert model.eval()(ids).cache is not None
