"""Gradient checkpointing (non-reentrant, transformers' default) with FAM: the same gradients as without, the
layers really recomputed, and gradients flowing through the memory across every block of a sequence."""

from __future__ import annotations

import inspect

import pytest
import torch
from conftest import assert_close, random_ids, tiny_model
from peft import get_peft_model

import hf_fam
from hf_fam.training import fam_lora_config

C, M, F, N = 4, 0, 2, 24  # M = 0: block 1 reaches the last block only through the memory


def _model(family, with_lora=False, checkpointing=False):
    model = hf_fam.FAMForCausalLM.from_base_model(tiny_model(family), block_size=C, memory_segments=M, fam_length=F)
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if with_lora:
        torch.manual_seed(3)
        model = get_peft_model(model, fam_lora_config(model, r=4, init_lora_weights=False))
    return model.train()


def _grads(model, ids):
    embeds = model.get_input_embeddings()(ids).detach().requires_grad_(True)
    out = model(inputs_embeds=embeds, labels=ids, use_cache=False)
    out.loss.backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    return out.loss.detach(), embeds.grad, grads


@pytest.mark.parametrize("with_lora", [False, True], ids=["full", "lora"])
def test_same_gradients_with_and_without_checkpointing(family, with_lora):
    ids = random_ids(2, N, seed=11)
    loss, emb_grad, grads = _grads(_model(family, with_lora), ids)

    model = _model(family, with_lora, checkpointing=True)
    calls = []
    for layer in hf_fam.training.unwrap_fam_model(model).get_decoder().layers:
        layer.mlp.register_forward_hook(lambda *args: calls.append(1))
    loss_gc, emb_grad_gc, grads_gc = _grads(model, ids)
    forward_calls = len(calls)
    assert forward_calls > 0

    assert_close(loss_gc, loss, atol=1e-6, msg="loss")
    assert_close(emb_grad_gc, emb_grad, atol=1e-5, msg="input gradient")
    assert grads_gc.keys() == grads.keys() and any("fam" in name for name in grads)
    for name in grads:
        assert_close(grads_gc[name], grads[name], atol=1e-5, msg=name)
    # the block layers (and the FAM chain inside them) ran again during backward
    model.zero_grad()
    calls.clear()
    with torch.no_grad():
        model(input_ids=ids, use_cache=False)
    assert forward_calls > len(calls), "nothing was recomputed: checkpointing is not active"


def test_memory_carries_gradients_across_all_blocks_with_checkpointing(family):
    model = _model(family, with_lora=True, checkpointing=True)
    ids = random_ids(1, N, seed=12)
    embeds = model.get_input_embeddings()(ids).detach().requires_grad_(True)
    logits = model(inputs_embeds=embeds, use_cache=False).logits
    logits[:, -C:].sum().backward()  # loss of the last block only
    per_block = embeds.grad[0].abs().sum(-1).view(N // C, C).sum(-1)
    assert (per_block > 0).all(), f"blocks without gradient: {per_block.tolist()}"
    assert hf_fam.training.unwrap_fam_model(model).fam.modules_to_save.default.fam_init.grad.abs().sum() > 0


def test_recompute_leaves_the_forward_results_and_frees_each_layer(family):
    """The backward's recompute runs each layer again; the forward's final FAM stays in `fam_state` (a
    recomputed one would carry the recomputed layer's graph, holding its activations until the backward ends:
    the retained memory grew with every layer), and each layer's recomputed activations are freed as soon as
    its backward is done."""
    import weakref

    model = _model(family, with_lora=True, checkpointing=True)
    ids = random_ids(2, N, seed=13)
    out = model(input_ids=ids, labels=ids, use_cache=False)
    forward_fam = list(out.fam_state)
    recomputed = []  # weak references to the tensors every layer's MLP makes while recomputed in backward
    for layer in hf_fam.training.unwrap_fam_model(model).get_decoder().layers:
        layer.mlp.register_forward_hook(
            lambda mod, args, y: recomputed.append(weakref.ref(y)) if not torch.is_grad_enabled() or
            torch._C._current_graph_task_id() >= 0 else None)
    out.loss.backward()
    assert all(a is b for a, b in zip(out.fam_state, forward_fam)), "fam_state was replaced by a recompute"
    assert recomputed, "nothing was recomputed"
    assert all(r() is None for r in recomputed), "recomputed activations outlived the backward"


def _has_checkpointing_options() -> bool:
    from transformers import PreTrainedModel

    enable = getattr(PreTrainedModel, "activation_checkpointing_enable", None)
    return enable is not None and "every_n_layers" in inspect.signature(enable).parameters


def _offloaded(checkpoint_func):
    def offloaded(*args, **kwargs):
        with torch.autograd.graph.save_on_cpu(pin_memory=False):
            return checkpoint_func(*args, **kwargs)

    return offloaded


@pytest.mark.skipif(not _has_checkpointing_options(),
                    reason="this transformers has no activation_checkpointing_enable(every_n_layers=, offload=)")
@pytest.mark.parametrize("offload", [False, True], ids=["kept", "offloaded"])
def test_every_other_layer_and_offloaded_checkpointing_give_the_same_gradients(family, offload):
    """transformers' checkpointing options (5.23 on; also TrainingArguments' activation_checkpointing_kwargs):
    checkpoint every n-th layer only, and hold the saved activations on the host. The FAM chain in a checkpointed
    layer is recomputed with it, the one in a plain layer is not, and the gradients are those without
    checkpointing."""
    ids = random_ids(2, N, seed=14)
    loss, emb_grad, grads = _grads(_model(family, with_lora=True), ids)

    model = _model(family)
    model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False},
                                          every_n_layers=2)
    if offload:  # what offload=True does, without its pinned memory (which needs an accelerator): each saved
        # tensor goes to the host and comes back in backward as another tensor
        for layer in model.get_decoder().layers:
            layer._gradient_checkpointing_func = _offloaded(layer._gradient_checkpointing_func)
    torch.manual_seed(3)
    model = get_peft_model(model, fam_lora_config(model, r=4, init_lora_weights=False)).train()
    layers = hf_fam.training.unwrap_fam_model(model).get_decoder().layers
    assert len(layers) >= 2 and [bool(layer.gradient_checkpointing) for layer in layers][:2] == [True, False]
    calls = {i: 0 for i in range(len(layers))}
    for i, layer in enumerate(layers):
        layer.mlp.register_forward_hook(lambda *args, i=i: calls.__setitem__(i, calls[i] + 1))
    loss_gc, emb_grad_gc, grads_gc = _grads(model, ids)

    assert_close(loss_gc, loss, atol=1e-6, msg="loss")
    assert_close(emb_grad_gc, emb_grad, atol=1e-5, msg="input gradient")
    assert grads_gc.keys() == grads.keys() and any("fam" in name for name in grads)
    for name in grads:
        assert_close(grads_gc[name], grads[name], atol=1e-5, msg=name)
    # a forward calls each MLP once per block and once per chain step; the checkpointed layer's run again in
    # backward (its chain's results reused), the plain layer's only once
    assert calls[0] > calls[1], calls



@pytest.mark.parametrize("with_lora", [False, True], ids=["full", "lora"])
def test_bf16_autocast_with_checkpointing_runs_without_the_cast_cache(with_lora):
    """Under autocast a checkpointed FAM forward turns autocast's cast cache off, in its recompute too: FAM uses
    each layer's weights more than once per forward, and a cast cached in the forward that the recompute makes
    afresh broke torch 2.6.0's checkpoint ("Recomputed values ... have different metadata"; torch 2.13 tolerates
    it). The gradients are then exactly those of the same forward under autocast without its cache and without
    checkpointing. (With the cache, a weight used k times gets one cast whose gradient sums the k uses in bf16;
    without it, each use's gradient reaches the fp32 weight on its own: here 0.2 % apart, bf16's rounding.)"""
    ids = random_ids(2, N, seed=5)
    results, seen = [], []
    for checkpointing in (False, True):
        model = _model("llama", with_lora, checkpointing=checkpointing)
        layers = hf_fam.training.unwrap_fam_model(model).get_decoder().layers
        hook = layers[0].register_forward_pre_hook(lambda *args: seen.append(torch.is_autocast_cache_enabled()))
        with torch.autocast("cpu", dtype=torch.bfloat16, cache_enabled=checkpointing):
            results.append(_grads(model, ids))
            assert torch.is_autocast_cache_enabled() == checkpointing  # as the caller set it, after the forward
        hook.remove()
        assert len(seen) > 2 and not any(seen), "the cast cache was on in a layer of a checkpointed FAM forward"
        seen.clear()
    (loss, emb_grad, grads), (loss_gc, emb_grad_gc, grads_gc) = results
    assert torch.equal(loss_gc, loss) and torch.equal(emb_grad_gc, emb_grad)
    assert grads_gc.keys() == grads.keys()
    for name in grads:
        assert torch.equal(grads_gc[name], grads[name]), name
