"""Whether a run left the model a language model: its loss on real text read within one block, before and after.

The held-out loss (hf_fam/training/heldout.py) scores the training data's labels, the answer's digits for passkey
data: a run can lower it while the model stops producing text. Tried on SmolLM2-135M converted at the paper's
settings (C = 1024, M = 3, F = 64), a 4-step passkey run brought the held-out loss from 0.429 to 0.041 while greedy
decoding of "The capital of France is" went from " Paris." to " wisk wis land wis wis", and this module's text
loss went from 2.897 (the model as given) to 4.578 (4.564 at the training start). So `hf-fam finetune` also reads
the start of Python's documentation (`pydoc_text`, which no training data is drawn from), at most one block and
`TEXT_TOKENS` tokens so that the memory's updates are not what is measured, with the model as given and the
trained model, and warns when the perplexity there has more than doubled.
"""

from __future__ import annotations

import logging
import math

import torch

logger = logging.getLogger("hf_fam.training")

TEXT_TOKENS = 256  # at most this many tokens (and one block)
WORSE_BY = 2.0  # a trained perplexity above this multiple of the model as given's is warned about


def text_ids(tokenizer, block_size: int) -> torch.Tensor | None:
    """(1, n) token ids of the start of Python's documentation, BOS first where the tokenizer has one; n is at most
    one block and TEXT_TOKENS. None without a tokenizer."""
    from ..evaluation.texts import pydoc_text

    if tokenizer is None:
        return None
    ids = tokenizer(pydoc_text()[: 8 * TEXT_TOKENS], add_special_tokens=False).input_ids
    bos = getattr(tokenizer, "bos_token_id", None)
    ids = ([bos] if bos is not None else []) + ids
    return torch.tensor([ids[: min(block_size, TEXT_TOKENS)]])


@torch.no_grad()
def text_loss(model, ids: torch.Tensor | None, device) -> float | None:
    """`model`'s mean loss on `ids` in eval mode (None when there are no ids)."""
    if ids is None or ids.shape[1] < 2:
        return None
    was_training = model.training
    model.eval()
    try:
        ids = ids.to(device)
        return model(input_ids=ids, labels=ids, use_cache=False).loss.float().item()
    finally:
        model.train(was_training)


def check(given: float | None, final: float | None, tokens: int, start: float | None = None) -> str:
    """The line `hf-fam finetune` logs, a warning when the trained model reads text much worse than the model as
    given; "" when either is unknown. `start`: the training start's loss, where it is not the model as given."""
    if given is None or final is None:
        return ""
    at_start = "" if start is None else f", {start:.4f} at the training start"
    line = (f"text within one block (Python's documentation, {tokens} tokens): loss {given:.4f} as given{at_start} "
            f"-> {final:.4f}")
    if final - given > math.log(WORSE_BY):
        logger.warning("%s: perplexity %.1f times the model as given's; the trained model may no longer produce text: "
                       "mix text into the data (--data mix) or train longer", line, math.exp(final - given))
    else:
        logger.info(line)
    return line


__all__ = ["TEXT_TOKENS", "WORSE_BY", "check", "text_ids", "text_loss"]
