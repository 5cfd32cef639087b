"""The held-out loss of `hf-fam finetune`: whether the run made the model better, on sequences it did not train on.

A few sequences of the training data (`--heldout N`, at most a tenth of it) are kept out of training, and the
model's loss on them (each read from its initial memory, in eval mode: no dropout, no Random State Passing; over
the labelled tokens, so the answer's digits for passkey data) is measured three times: on the model as given
(a converted checkpoint in its zero-shot start, before training switches it to the paper's update and gives its
memory content slots), at the training start, and after the last step. The first two differ: training starts
from a worse language model than the checkpoint it was given (docs/training.md, "Where training starts the
memory"), which the training loss alone does not show.
"""

from __future__ import annotations

import logging

import torch

logger = logging.getLogger("hf_fam.training")

HELDOUT_SHARE = 10  # at most 1/HELDOUT_SHARE of the sequences are held out


def split_heldout(dataset, count: int, seed: int):
    """(training sequences, held-out sequences or None): `count` sequences, at most a tenth of `dataset`, drawn
    with `seed`."""
    count = min(count, len(dataset) // HELDOUT_SHARE)
    if count == 0:
        return dataset, None
    split = dataset.train_test_split(test_size=count, seed=seed, shuffle=True)
    return split["train"], split["test"]


@torch.no_grad()
def heldout_loss(model, heldout, collator, batch_size: int, device, progress: str | None = None) -> float:
    """The mean loss per labelled token of `model` on `heldout`, each sequence from the initial memory.
    `progress`: a progress bar's description (a pass over long sequences takes minutes on a CPU); None: none."""
    from tqdm.auto import tqdm

    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    try:
        for start in tqdm(range(0, len(heldout), batch_size), desc=progress, unit="batch", disable=progress is None,
                          leave=False):
            batch = collator([heldout[i] for i in range(start, min(start + batch_size, len(heldout)))])
            batch = {k: v.to(device) for k, v in batch.items()}
            tokens = int((batch["labels"][:, 1:] != -100).sum())
            if tokens:
                total += model(**batch, use_cache=False).loss.float().item() * tokens
                count += tokens
    finally:
        model.train(was_training)
    return total / max(count, 1)


def worse_than(losses: dict) -> bool:
    """Warn when the run left the held-out loss above the model it was given (or, for a start that is the model
    as given, above the start): the trained model is worse on data it did not see. Returns whether it warned."""
    reference = losses.get("given", losses.get("start"))
    if reference is None or losses.get("final") is None or losses["final"] <= reference:
        return False
    logger.warning("the held-out loss ended above the model as given (%.4f > %.4f): the trained model is worse on "
                   "sequences it did not see; train longer, with a lower --lr, or keep the model as given",
                   losses["final"], reference)
    return True


def heldout_text(given: float | None, start: float | None, final: float | None, count: int) -> str:
    """"held-out loss 6.17 -> 3.02 (as given 2.59; 16 sequences)", or "" when nothing was held out."""
    if final is None:
        return ""
    text = f"held-out loss {start:.4f} -> {final:.4f}" if start is not None else f"held-out loss {final:.4f}"
    extra = ([f"as given {given:.4f}"] if given is not None else []) + [f"{count} sequences"]
    return f"{text} ({'; '.join(extra)})"


__all__ = ["heldout_loss", "heldout_text", "split_heldout", "worse_than"]
