"""The demo's training batches: synthetic passkey examples, with far and near keys in set shares."""

from __future__ import annotations

import random

import torch

from ...tasks.passkey import PasskeyConfig, SyntheticPasskeyVocab, synthetic_passkey_example
from .config import DemoConfig

VOCAB = SyntheticPasskeyVocab()


def make_batch(config: DemoConfig, seq_len: int, rng: random.Random,
               batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A training batch of synthetic passkey examples of length `seq_len`.

    The key's depth is uniform, except that a share `far_key_prob` of the examples put it far back (those need
    the memory once the sequence outgrows the window): anywhere more than L·M blocks before the query's block
    with `far_key_anywhere`, else in the first block; and a share `near_key_prob` in the last attention window
    (those keep direct retrieval trained at every length).
    """
    n_filler = seq_len - 2 * 5 - 3  # filler tokens around `KEY d1..d5 ENDK` and `QRY`
    far_end = max(0.0, (config.block_size - 7) / max(1, n_filler))  # the first block
    if config.far_key_anywhere:  # up to the start of the block L·M + 1 blocks before the query's block
        reach = config.block_size * (config.num_layers * config.memory_segments + 1)
        far_end = max(far_end, 1.0 - (reach + config.block_size) / max(1, n_filler))
    last_window = max(0.0, 1.0 - (config.window - 13) / max(1, n_filler))
    rows = []
    for _ in range(batch_size):
        u = rng.random()
        if u < config.far_key_prob:
            depth = rng.random() * far_end
        elif u < config.far_key_prob + config.near_key_prob:
            depth = last_window + rng.random() * (1.0 - last_window)
        else:
            depth = rng.random()
        data = PasskeyConfig(num_examples=1, seq_len=seq_len, form="synthetic", depth=min(1.0, depth),
                             seed=rng.randrange(2**31))
        rows.append(synthetic_passkey_example(data, 0))
    ids = torch.tensor([r["input_ids"] for r in rows])
    labels = torch.tensor([r["labels"] for r in rows])
    return ids, labels
