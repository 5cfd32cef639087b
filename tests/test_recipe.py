"""The paper's training recipe: Random State Passing and Random Position Offset each change what they should
and nothing else, in plain loops and under the HF Trainer."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import assert_close, random_ids, tiny_model

import hf_fam
from hf_fam.training import FAMRecipeConfig, attach_recipe, max_rope_wavelength

RSP_ONLY = FAMRecipeConfig(state_passing_prob=1.0, position_offset_prob=0.0)
RPO_ONLY = FAMRecipeConfig(state_passing_prob=0.0, position_offset_prob=1.0)


def _fam(family="llama", fam_length=3, **overrides):
    base = tiny_model(family, **overrides)
    return hf_fam.FAMForCausalLM.from_base_model(base, block_size=4, memory_segments=0, fam_length=fam_length).train()


@pytest.mark.parametrize(
    "kwargs,needle",
    [
        (dict(state_passing_prob=1.5), "state_passing_prob must be a probability in \\[0, 1\\], got 1.5"),
        (dict(position_offset_prob=-0.1), "position_offset_prob must be a probability"),
        (dict(max_position_offset=0), "max_position_offset must be a positive integer or None, got 0"),
        (dict(seed=1.5), "seed must be an integer"),
    ],
)
def test_config_rejects_bad_values(kwargs, needle):
    with pytest.raises(ValueError, match=needle):
        FAMRecipeConfig(**kwargs)


def test_paper_defaults():
    config = FAMRecipeConfig()
    assert (config.state_passing_prob, config.position_offset_prob, config.max_position_offset) == (0.8, 0.5, None)


def test_max_offset_is_the_largest_rope_wavelength(family):
    assert max_rope_wavelength(_fam(family)) == int(2 * math.pi * 10_000)
    model = _fam(family, rope_parameters={"rope_type": "default", "rope_theta": 500_000.0})
    assert max_rope_wavelength(model) == int(2 * math.pi * 500_000)


# ---------------------------------------------------------------------------------------------------------
# Random State Passing
# ---------------------------------------------------------------------------------------------------------
def test_state_passing_starts_from_the_previous_final_state(family):
    model = _fam(family)
    ids1, ids2 = random_ids(2, 22, seed=1), random_ids(2, 22, seed=2)
    # the references run with autograd on, like the training forwards they are compared with bitwise (without
    # autograd, block attention takes the split path: the same values to ~1e-7, not the same bits)
    plain1, plain2 = model(ids1).logits.detach(), model(ids2).logits.detach()

    recipe = attach_recipe(model, RSP_ONLY)
    out1 = model(ids1, labels=ids1)
    # first step: nothing saved yet, so fam_init is used and nothing changes
    assert not recipe.last_draw.used_saved_state
    assert_close(out1.logits, plain1, atol=0.0, msg="first step")
    assert len(recipe.saved_state) == 2
    for saved, final in zip(recipe.saved_state, out1.fam_state):
        assert saved.shape == (1, 3, 64) and not saved.requires_grad  # row 0, detached
        assert_close(saved, final[:1], atol=0.0)
    out1.loss.backward()
    model.zero_grad()

    out2 = model(ids2, labels=ids2)
    assert recipe.last_draw.used_saved_state
    out2.loss.backward()  # no "backward through the graph a second time": the state is detached
    assert model.fam.fam_init.grad is None or model.fam.fam_init.grad.abs().sum() == 0  # fam_init unused this step
    assert model.get_input_embeddings().weight.grad.abs().sum() > 0
    recipe.remove()
    expected = model(ids2, fam_state=[s[:1] for s in out1.fam_state]).logits.detach()
    assert_close(out2.logits.detach(), expected, atol=0.0, msg="second step = explicit fam_state of row 0")
    assert (out2.logits - plain2).abs().max() > 1e-3, "the passed state must matter"
    assert_close(model(ids2).logits.detach(), plain2, atol=0.0, msg="after remove")


def test_state_passing_is_off_in_eval_mode_and_at_p0():
    model = _fam()
    ids = random_ids(2, 22, seed=4)
    with torch.no_grad():
        plain = model(ids).logits
    recipe = attach_recipe(model, RSP_ONLY)
    model(random_ids(2, 22, seed=5))  # a state is saved
    saved = recipe.saved_state
    model.eval()
    with torch.no_grad():
        assert_close(model(ids).logits, plain, atol=0.0, msg="eval mode")
    assert recipe.saved_state is saved, "eval forwards must not replace the saved state"
    recipe.remove()

    model.train()
    recipe = attach_recipe(model, FAMRecipeConfig(state_passing_prob=0.0, position_offset_prob=0.0))
    for _ in range(3):
        with torch.no_grad():
            assert_close(model(ids).logits, plain, atol=0.0, msg="p = 0")
    assert recipe.saved_state is None
    recipe.remove()


def test_state_passing_frequency_and_determinism():
    model = _fam()
    draws = []
    for _ in range(2):
        recipe = attach_recipe(model, FAMRecipeConfig(state_passing_prob=0.8, position_offset_prob=0.0, seed=3))
        recipe.saved_state = [torch.zeros(1, 3, 64)] * 2
        draws.append([recipe.draw(2).used_saved_state for _ in range(2000)])
        recipe.remove()
    assert draws[0] == draws[1], "same seed, same draws"
    assert abs(sum(draws[0]) / 2000 - 0.8) < 0.04


def test_caller_arguments_win_and_global_rng_is_untouched():
    model = _fam()
    ids = random_ids(2, 22, seed=6)
    recipe = attach_recipe(model, FAMRecipeConfig(state_passing_prob=1.0, position_offset_prob=1.0))
    model(ids)
    given = [torch.randn(1, 3, 64) for _ in range(2)]
    rng = torch.get_rng_state()
    with torch.no_grad():
        out = model(ids, fam_state=given).logits
        recipe.remove()
        assert_close(out, model(ids, fam_state=given).logits, atol=0.0, msg="explicit fam_state kept")
    attach_recipe(model, FAMRecipeConfig(state_passing_prob=1.0, position_offset_prob=1.0))
    for _ in range(3):
        model(ids)
    assert torch.equal(rng, torch.get_rng_state()), "the recipe must draw from its own generator"


# ---------------------------------------------------------------------------------------------------------
# Random Position Offset
# ---------------------------------------------------------------------------------------------------------
def _capture_positions(model):
    seen = []
    rotary = model.get_decoder().rotary_emb
    def hook(module, args, kwargs):
        seen.append((kwargs["position_ids"] if "position_ids" in kwargs else args[1]).clone())

    handle = rotary.register_forward_pre_hook(hook, with_kwargs=True)
    return seen, handle


def test_position_offset_moves_rotary_positions_and_only_rounding(family):
    model = _fam(family)
    ids = random_ids(3, 22, seed=7)
    seen, handle = _capture_positions(model)
    plain = model(ids, labels=ids)
    plain_positions = list(seen)
    seen.clear()

    recipe = attach_recipe(model, FAMRecipeConfig(state_passing_prob=0.0, position_offset_prob=1.0, seed=1))
    shifted = model(ids, labels=ids)
    offset = recipe.last_draw.position_offset
    assert offset.shape == (3,) and offset.dtype == torch.long and (offset > 0).all()
    # the rotary embedding sees every position (tokens (B, N) and memory (1 or B, F)) moved by the row's offset
    assert len(seen) == len(plain_positions) == 2
    for before, after in zip(plain_positions, seen):
        assert torch.equal(after, before + offset[:, None])
    # every block is computed in its own frame: only float rounding of the rotary angles changes
    worst = assert_close(shifted.logits, plain.logits, atol=1e-4, msg="offset logits")
    assert abs(shifted.loss.item() - plain.loss.item()) < 1e-4
    assert worst > 0.0, "the offset did reach the rotary embedding"
    assert recipe.saved_state is None
    recipe.remove()
    handle.remove()


def test_position_offset_distribution():
    model = _fam()
    recipe = attach_recipe(model, FAMRecipeConfig(state_passing_prob=0.0, position_offset_prob=0.5, seed=2))
    offsets = torch.cat([recipe.draw(8).position_offset for _ in range(500)])
    zero = (offsets == 0).float().mean().item()
    assert abs(zero - 0.5) < 0.04, zero
    wavelength = int(2 * math.pi * 10_000)
    assert offsets.max() < wavelength and offsets.max() > 0.9 * wavelength
    nonzero = offsets[offsets > 0].float()
    assert abs(nonzero.mean().item() / wavelength - 0.5) < 0.05  # uniform
    custom = attach_recipe(model, FAMRecipeConfig(position_offset_prob=1.0, max_position_offset=10))
    assert custom.draw(100).position_offset.max() < 10


def test_position_offset_off_in_eval_mode():
    model = _fam().eval()
    recipe = attach_recipe(model, RPO_ONLY)
    seen, handle = _capture_positions(model)
    with torch.no_grad():
        model(random_ids(2, 10))
    assert recipe.last_draw is None and all((p < 100).all() for p in seen)
    handle.remove()


# ---------------------------------------------------------------------------------------------------------
# with PEFT and the HF Trainer, and in a loop that calls forward directly
# ---------------------------------------------------------------------------------------------------------
def test_trainer_runs_the_recipe(tmp_path):
    from peft import get_peft_model
    from transformers import Trainer, TrainingArguments

    from hf_fam.training import FAMDataCollator, PasskeyConfig, fam_lora_config, passkey_dataset

    model = _fam()
    peft_model = get_peft_model(model, fam_lora_config(model, r=4))
    recipe = attach_recipe(peft_model, FAMRecipeConfig(state_passing_prob=1.0, position_offset_prob=0.5))
    data = passkey_dataset(PasskeyConfig(num_examples=8, seq_len=24, form="synthetic"))
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=3, per_device_train_batch_size=2, use_cpu=True,
                             report_to=[], save_strategy="no", logging_steps=1, disable_tqdm=True, learning_rate=1e-2)
    trainer = Trainer(model=peft_model, args=args, train_dataset=data, data_collator=FAMDataCollator())
    history = trainer.train()
    assert math.isfinite(history.training_loss)
    assert recipe.forwards == 3 and recipe.last_draw.used_saved_state
    assert recipe.saved_state[0].shape == (1, 3, 64)
    fam_init = peft_model.base_model.model.fam
    assert (fam_init.modules_to_save.default.fam_init - fam_init.original_module.fam_init).abs().max() > 0


def test_direct_forward_loop_uses_draw_and_observe():
    model = _fam()
    recipe = hf_fam.training.FAMTrainingRecipe(model, RSP_ONLY)  # not attached: the loop applies it
    ids = random_ids(2, 22, seed=8)
    for _ in range(2):
        out = model.forward(ids, **recipe.forward_kwargs(recipe.draw(ids.shape[0])))
        recipe.observe(out)
    assert recipe.forwards == 2 and recipe.last_draw.used_saved_state


def test_outputs_declare_fam_state_so_ddp_can_rebuild_them():
    """DDP flattens outputs to a pytree and rebuilds them from their class's fields: fam_state is one."""
    from torch.utils import _pytree

    model = _fam()
    ids = random_ids(2, 10)
    recipe = attach_recipe(model, FAMRecipeConfig(state_passing_prob=0.0, position_offset_prob=0.0))
    out = model(ids, labels=ids)
    assert type(out).__name__ == "FAMCausalLMOutputWithPast" and "fam_state" in out
    leaves, spec = _pytree.tree_flatten(out)
    rebuilt = _pytree.tree_unflatten(leaves, spec)
    assert_close(rebuilt.logits, out.logits, atol=0.0)
    assert all(torch.equal(a, b) for a, b in zip(rebuilt.fam_state, out.fam_state))
    recipe.remove()
