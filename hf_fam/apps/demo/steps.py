"""The demo's three steps as processes: the short-context model's learning-rate race (step 1), then FAM and BSWA
each fine-tuned and evaluated in a process of its own (steps 2 and 3)."""

from __future__ import annotations

import os
from dataclasses import replace

import torch

from .config import DemoConfig
from .model import build_base, build_model
from .training import train


def evaluate(model, config: DemoConfig, label: str) -> dict:
    from ...evaluation import PasskeyEvalConfig, evaluate_passkey

    lengths = [int(round(m * config.window)) for m in config.eval_multiples]
    eval_config = PasskeyEvalConfig(lengths=lengths, trials=config.eval_trials, form="synthetic",
                                    seed=10_000 + config.seed, batch_size=config.eval_batch_size)
    return evaluate_passkey(model, eval_config, label=label)


_BEST_STEP = None  # for pretraining candidates: the shared fewest steps any candidate needed so far


def _init_pretrain_worker(best_step) -> None:
    global _BEST_STEP
    _BEST_STEP = best_step


def _pretrain_candidate(args) -> dict:
    """One short-context candidate: the seed's initial weights trained at one learning rate.

    Gives up once it has taken more steps than a candidate that already reached the goal, so the winner
    (fewest steps, then the earlier learning rate) does not depend on which process runs faster.
    """
    config, index, lr, threads, path = args
    best = _BEST_STEP
    torch.set_num_threads(threads)
    base = build_base(config)
    short = replace(config, start_len=config.pretrain_len, max_train_len=config.pretrain_len,
                    max_steps=config.pretrain_steps, lr=lr, train_seconds=float("inf"),
                    far_key_prob=0.0, near_key_prob=0.0, short_batch_prob=0.0)
    history = train(base, short, stop_at=config.pretrain_stop_at, give_up=lambda step: step > best.value)
    if history["reached"]:
        with best.get_lock():
            best.value = min(best.value, history["steps"])
    torch.save(base.state_dict(), path)
    return {"index": index, "lr": lr, "history": history}


def pretrain(config: DemoConfig, log=None, *, parallel: bool = True) -> tuple[object, dict]:
    """Step 1: the short-context model (full attention) learns the task on `pretrain_len` tokens.

    How fast a tiny model forms the retrieval circuit varies a lot with the seed and the learning rate:
    measured over seeds 0-4, each of 1e-3 and 2e-3 stalls near 0.9 exact match for some seed (seed 2 at
    1e-3, seed 1 at 2e-3) while the other rate gets there in 800-2,500 steps. So the candidates of
    `pretrain_lrs` start from the same weights and race, one process and one core each; the first, in steps,
    to reach `pretrain_stop_at` wins. The result is deterministic: it does not depend on process speed.
    Returns the winning model and its history (with `lr` and every candidate's outcome).
    """
    import multiprocessing as mp
    import tempfile

    ctx = mp.get_context("spawn")
    best = ctx.Value("l", config.pretrain_steps + 1)
    lrs = list(config.pretrain_lrs)
    with tempfile.TemporaryDirectory() as tmp:
        if parallel and len(lrs) > 1:
            from concurrent.futures import ProcessPoolExecutor

            jobs = [(config, i, lr, 1, os.path.join(tmp, f"{i}.pt")) for i, lr in enumerate(lrs)]
            with ProcessPoolExecutor(max_workers=len(lrs), mp_context=ctx, initializer=_init_pretrain_worker,
                                     initargs=(best,)) as pool:
                runs = list(pool.map(_pretrain_candidate, jobs))
        else:
            _init_pretrain_worker(best)
            threads = torch.get_num_threads()
            runs = [_pretrain_candidate((config, i, lr, threads, os.path.join(tmp, f"{i}.pt")))
                    for i, lr in enumerate(lrs)]
        reached = [r for r in runs if r["history"]["reached"]]
        if reached:
            win = min(reached, key=lambda r: (r["history"]["steps"], r["index"]))
        else:  # none got there: the best exact match at the step cap
            win = max(runs, key=lambda r: (r["history"]["final_match"], -r["index"]))
        base = build_base(config)
        base.load_state_dict(torch.load(os.path.join(tmp, f"{win['index']}.pt"), weights_only=True))
    base.eval()
    history = dict(win["history"], lr=win["lr"], candidates=[
        {"lr": r["lr"], "steps": r["history"]["steps"], "reached": r["history"]["reached"],
         "final_match": r["history"]["final_match"]} for r in runs])
    if log:
        for c in history["candidates"]:
            log(f"    lr {c['lr']:g}: {'reached' if c['reached'] else 'stopped at'} step {c['steps']}, "
                f"exact match {c['final_match']:.2f}")
    return base, history


def _finetune_and_evaluate(args) -> dict:
    """Step 2 and 3 for one model, in its own process: wrap, fine-tune, evaluate, save the weights."""
    config, variant, base_path, weights_path = args
    threads = config.fam_threads if variant == "FAM" and config.fam_threads else config.threads_per_model
    torch.set_num_threads(threads)
    base = build_base(config)
    base.load_state_dict(torch.load(base_path, weights_only=True))
    model = build_model(config, config.fam_length if variant == "FAM" else 0, base)
    log = (lambda message: print(f"    [{variant}] {message}", flush=True)) if config.log_every else None
    history = train(model, config, log=log)
    with torch.no_grad():
        results = evaluate(model, config, variant)
    torch.save(model.state_dict(), weights_path)
    return {"variant": variant, "history": history, "eval": results, "weights": weights_path}
