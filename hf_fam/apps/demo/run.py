"""`run_demo`: the three steps end to end, and what they write."""

from __future__ import annotations

import os
import time
from dataclasses import asdict
from pathlib import Path

import torch

from .config import DemoConfig
from .model import build_model
from .report import format_table, require_matplotlib, save_checkpoint
from .steps import _finetune_and_evaluate, pretrain


def run_demo(config: DemoConfig, out_dir: str | Path, *, parallel: bool = True, log=print, plot: bool = True) -> dict:
    """Pretrain the short-context model, fine-tune FAM and BSWA from it, evaluate both; write results.json,
    the FAM checkpoint (with a model card) and, with `plot`, passkey.png under `out_dir`.

    matplotlib (the `demo` extra) is checked for before any work when `plot` is set, and the plot is drawn
    last: what was computed is on disk whatever happens to it.

    Returns the results dict (also written to `out_dir/results.json`).
    """
    import tempfile

    from ...evaluation import plot_passkey, write_json

    if plot:
        require_matplotlib("the demo's plot (passkey.png; pass plot=False, or --no-plot, to skip it)")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    log(f"1/3 short-context model: full attention on {config.pretrain_len}-token sequences, learning rates "
        f"{', '.join(f'{lr:g}' for lr in config.pretrain_lrs)} raced ...")
    base, pre_history = pretrain(config, log=log, parallel=parallel)
    log(f"    lr {pre_history['lr']:g}: {pre_history['steps']} steps in {pre_history['seconds']} s, "
        f"training exact match {pre_history['final_match']:.2f}")
    if not pre_history["reached"]:
        log(f"    warning: no short-context candidate reached {config.pretrain_stop_at:.2f} exact match in "
            f"{config.pretrain_steps} steps; both fine-tuned models start weak")
    with tempfile.TemporaryDirectory(dir=out_dir) as tmp:
        base_path = os.path.join(tmp, "base.pt")
        torch.save(base.state_dict(), base_path)
        jobs = [(config, v, base_path, os.path.join(tmp, f"{v}.pt")) for v in ("FAM", "BSWA")]
        log(f"2/3 fine-tuning FAM and BSWA for {config.max_steps} steps each "
            f"({'side by side' if parallel else 'one after the other'}), then 3/3 evaluating ...")
        if parallel:
            import multiprocessing as mp
            from concurrent.futures import ProcessPoolExecutor

            with ProcessPoolExecutor(max_workers=2, mp_context=mp.get_context("spawn")) as pool:
                runs = list(pool.map(_finetune_and_evaluate, jobs))
        else:
            runs = [_finetune_and_evaluate(job) for job in jobs]
        by_variant = {r["variant"]: r for r in runs}
        fam_model = build_model(config, config.fam_length, base)
        fam_model.load_state_dict(torch.load(by_variant["FAM"]["weights"], weights_only=True))
    results = {
        "config": asdict(config),
        "minutes": round((time.perf_counter() - t0) / 60, 2),
        "window": config.window,
        "reach_blocks": config.num_layers * config.memory_segments,
        "pretrain": pre_history,
        "runs": {v: {"history": r["history"], "eval": r["eval"]} for v, r in by_variant.items()},
    }
    write_json(results, out_dir / "results.json")
    save_checkpoint(fam_model, by_variant["FAM"]["eval"], out_dir / "fam-passkey-model", config)
    log(format_table(results))
    if plot:
        plot_passkey([by_variant["FAM"]["eval"], by_variant["BSWA"]["eval"]], out_dir / "passkey.png",
                     title=f"Passkey retrieval, window {config.window} tokens (C={config.block_size}, "
                     f"M={config.memory_segments})")
    return results
