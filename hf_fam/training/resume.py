"""Continue an interrupted `hf-fam finetune` run: the training states `--save-every N` writes, and `--resume`.

A run writes its output only when it completes (a staging folder moved into place), so its states live beside the
output, in `OUTPUT.states/step-N/`: `state.pt`, the run's options and its log so far. Each is written whole under a
temporary name and renamed, and the older one removed after, so the newest state folder is always complete; the
folder goes when the run completes. A state holds what the rest of the run depends on: the trained weights (LoRA
and the modules trained in full, or every weight with --full), the optimizer and the learning-rate schedule, the
recipe's generator and the FAM state Random State Passing would pass on, the random generators, the loop's
counters (per process) and how many micro-batches were drawn.

`--resume` rebuilds the run from its options (the same model, data and seeds), loads the newest state and replays
the data order without computing on the micro-batches already trained, so that it ends with the weights the
uninterrupted run would have had (tested: the same digest). The options must be those of the interrupted run,
except how it is logged, saved and replaced (`FREE_OPTIONS`).
"""

from __future__ import annotations

import json
import logging
import random
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

logger = logging.getLogger("hf_fam.training")

STATES_SUFFIX = ".states"
STATE_FILE = "state.pt"
CONFIG_FILE = "finetune_config.json"
LOG_FILE = "train_log.jsonl"
# options that may differ between an interrupted run and its resumption: they do not change what is trained
FREE_OPTIONS = ("train.overwrite", "train.resume", "train.log_every", "train.save_every")


@dataclass
class LoopCounters:
    """Where the loop stands after an optimizer step (this process's part of the loss since the last log)."""

    step: int = 0
    batches: int = 0  # micro-batches drawn from the loader, over every epoch
    tokens: int = 0
    loss_sum: float = 0.0
    loss_count: int = 0
    seconds: float = 0.0
    final_loss: float = float("nan")
    by_start: list[float] = field(default_factory=lambda: [0.0] * 4)  # loss sum and count, fresh / passed memory
    final_split: list = field(default_factory=lambda: [None, None])  # final_loss's fresh / passed memory means
    heldout: dict = field(default_factory=dict)  # the held-out losses measured before the first step


def states_dir(out: Path) -> Path:
    return out.with_name(out.name + STATES_SUFFIX)


def newest_state(out: Path) -> Path | None:
    states = states_dir(out)
    found = [p for p in states.glob("step-*") if p.is_dir() and p.name[5:].isdigit() and (p / STATE_FILE).is_file()]
    return max(found, key=lambda p: int(p.name[5:]), default=None)


def check_states(out: Path, resume: bool, overwrite: bool) -> Path | None:
    """The state to resume from (with `resume`), or None; refuse, in one line, to mix a new run with the states
    of an interrupted one (unless `overwrite`, which starts over: `start_over` removes them)."""
    states = states_dir(out)
    if resume:
        newest = newest_state(out)
        if newest is None:
            raise ValueError(f"--resume: no training state in {states} (a run writes them with --save-every N)")
        return newest
    if newest_state(out) is not None and not overwrite:
        raise FileExistsError(f"{states} holds the training states of an interrupted run: continue it with --resume, "
                              "or pass --force to start over (they are removed)")
    return None


def start_over(out: Path) -> None:
    """Remove the states of an earlier run (a new run with --force, or the run completed)."""
    shutil.rmtree(states_dir(out), ignore_errors=True)


def save_state(out: Path, counters: LoopCounters, *, accelerator, model, optimizer, scheduler, recipe, config,
               log_path: Path) -> None:
    """Write `OUTPUT.states/step-N/` (every process takes part; the main process writes)."""
    from accelerate.utils import gather_object

    # what differs between processes: their counters, the state their recipe would pass, their generators
    per_process = gather_object([{"counters": asdict(counters), "recipe": recipe.state_dict(), "rng": _rng_state()}])
    if accelerator.is_main_process:
        states = states_dir(out)
        final = states / f"step-{counters.step}"
        tmp = states / f".step-{counters.step}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        torch.save({
            "processes": per_process,
            "trained": {n: p.detach().cpu() for n, p in model.named_parameters() if p.requires_grad},
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
        }, tmp / STATE_FILE)
        (tmp / CONFIG_FILE).write_text(json.dumps(_options(config), indent=2))
        if log_path.is_file():
            shutil.copyfile(log_path, tmp / LOG_FILE)
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)
        for older in states.glob("step-*"):
            if older != final:
                shutil.rmtree(older, ignore_errors=True)
        logger.info("step %d: training state saved to %s", counters.step, final)
    accelerator.wait_for_everyone()


def restore_state(path: Path, config, *, accelerator, model, optimizer, scheduler, recipe,
                  log_path: Path) -> LoopCounters:
    """Load the state at `path` into the rebuilt run (after checking its options are the interrupted run's) and
    return this process's counters."""
    saved = json.loads((path / CONFIG_FILE).read_text())
    differ = _differences(saved, _options(config))
    if differ:
        key, then, now = differ[0]
        raise ValueError(f"--resume: the interrupted run had {key} = {then!r}, this one {now!r}; resume with the "
                         f"options of the interrupted run ({path / CONFIG_FILE})")
    state = torch.load(path / STATE_FILE, map_location="cpu", weights_only=True)
    if accelerator.num_processes != len(state["processes"]):
        raise ValueError(f"--resume: the interrupted run had {len(state['processes'])} process(es), this one "
                         f"{accelerator.num_processes}; resume with as many")
    mine = state["processes"][accelerator.process_index]
    params = dict(model.named_parameters())
    missing = sorted(set(state["trained"]) ^ {n for n, p in params.items() if p.requires_grad})
    if missing:
        raise ValueError(f"--resume: {path / STATE_FILE} does not hold this run's trained weights (first: "
                         f"{missing[0]}); resume with the options of the interrupted run")
    with torch.no_grad():
        for name, tensor in state["trained"].items():
            params[name].copy_(tensor)
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    recipe.load_state_dict(mine["recipe"], device=accelerator.device)
    torch.set_rng_state(mine["rng"]["torch"])
    random.setstate(_python_rng(mine["rng"]["python"]))
    if mine["rng"]["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(mine["rng"]["cuda"])
    if accelerator.is_main_process and (path / LOG_FILE).is_file():
        shutil.copyfile(path / LOG_FILE, log_path)
    counters = LoopCounters(**mine["counters"])
    logger.info("resuming at step %d from %s", counters.step, path)
    return counters


def _rng_state() -> dict:
    return {"torch": torch.get_rng_state(), "python": random.getstate(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def _options(config) -> dict:
    return json.loads(json.dumps(asdict(config), default=str))


def _differences(then: dict, now: dict, prefix: str = "") -> list[tuple[str, object, object]]:
    found = []
    for key in sorted(set(then) | set(now)):
        name = f"{prefix}{key}"
        if name in FREE_OPTIONS:
            continue
        a, b = then.get(key), now.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            found += _differences(a, b, f"{name}.")
        elif a != b:
            found.append((name, a, b))
    return found


def _python_rng(state):
    """random.getstate()'s tuple, as torch.load gives it back (lists where there were tuples)."""
    version, internal, gauss = state
    return version, tuple(internal), gauss


__all__ = ["LoopCounters", "check_states", "newest_state", "restore_state", "save_state", "start_over",
           "states_dir"]
