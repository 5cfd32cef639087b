"""The demo's training loop: AdamW, warm-up then cosine schedule, the adaptive length curriculum."""

from __future__ import annotations

import math
import random
import time
from dataclasses import replace

import torch

from ...tasks.passkey import passkey_exact_match
from .config import DemoConfig
from .data import make_batch


def _lr_at(config: DemoConfig, step: int, progress: float) -> float:
    """Linear warm-up over steps, then cosine decay over the time budget."""
    warm = min(1.0, (step + 1) / config.warmup_steps)
    cosine = config.min_lr_ratio + (1 - config.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return config.lr * warm * cosine


def train(model, config: DemoConfig, *, log=None, stop_at: float | None = None, give_up=None) -> dict:
    """Train on passkey retrieval with the adaptive length curriculum; returns the training history.

    stop_at: stop once the mean training exact match of the last 10 steps reaches it (`reached` in the
        history says whether it did). give_up: called with the step count before every step; training
        stops when it returns True.
    """
    from ...training.recipe import FAMRecipeConfig, attach_recipe

    torch.manual_seed(config.seed)
    rng = random.Random(f"hf_fam.demo/{config.seed}")
    model.train()
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2 and "fam_init" not in n]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2 or "fam_init" in n]
    optim = torch.optim.AdamW([{"params": decay, "weight_decay": config.weight_decay},
                               {"params": no_decay, "weight_decay": 0.0}], lr=config.lr, betas=(0.9, 0.98))
    recipe = None
    if config.state_passing_prob > 0 and getattr(model.config, "fam_length", 0) > 0:
        recipe = attach_recipe(model, FAMRecipeConfig(state_passing_prob=config.state_passing_prob,
                                                      position_offset_prob=0.0, seed=config.seed))
    short_config = replace(config, far_key_prob=0.0, near_key_prob=0.0)
    seq_len, step, t0 = config.start_len, 0, time.perf_counter()
    history = {"steps": 0, "seconds": 0.0, "final_train_len": seq_len, "promotions": [], "loss": [], "match": [],
               "reached": False, "final_match": 0.0}
    recent = []
    try:
        while True:
            elapsed = time.perf_counter() - t0
            if elapsed >= config.train_seconds or (config.max_steps is not None and step >= config.max_steps):
                break
            if give_up is not None and give_up(step):
                break
            # the schedule follows the step budget when there is one, else the time budget
            progress = step / config.max_steps if config.max_steps else elapsed / config.train_seconds
            for group in optim.param_groups:
                group["lr"] = _lr_at(config, step, progress)
            batch_len, batch_config = seq_len, config
            if config.short_batch_prob > 0 and rng.random() < config.short_batch_prob:
                batch_len = config.pretrain_len  # key anywhere in one window
                batch_config = short_config
            ids, labels = make_batch(batch_config, batch_len, rng, config.batch_size)
            out = model(ids.to(config.device), labels=labels.to(config.device), use_cache=False)
            optim.zero_grad(set_to_none=True)
            out.loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
            optim.step()
            match = passkey_exact_match(out.logits.detach().cpu(), labels).float().mean().item()
            if batch_len == seq_len:  # the curriculum advances on the current length's results
                recent = (recent + [match])[-10:]
            step += 1
            if step % 10 == 0 and recent:
                history["loss"].append(round(out.loss.item(), 4))
                history["match"].append(round(sum(recent) / len(recent), 3))
                if log and step % max(config.log_every, 10) == 0:
                    log(f"step {step} len {seq_len} loss {out.loss.item():.3f} match {sum(recent) / len(recent):.2f}")
            if stop_at is not None and len(recent) == 10 and sum(recent) / 10 >= stop_at:
                history["reached"] = True
                break
            # adaptive curriculum: longer sequences once the current length is mostly solved
            if len(recent) == 10 and sum(recent) / 10 >= config.promote_at and seq_len < config.max_train_len:
                seq_len = min(config.max_train_len, seq_len + config.len_step)
                history["promotions"].append({"step": step, "seconds": round(time.perf_counter() - t0, 1),
                                              "length": seq_len})
                recent = []
    finally:
        if recipe is not None:
            recipe.remove()
    model.eval()
    history.update(steps=step, seconds=round(time.perf_counter() - t0, 1), final_train_len=seq_len,
                   final_match=round(sum(recent) / len(recent), 3) if recent else 0.0)
    return history
