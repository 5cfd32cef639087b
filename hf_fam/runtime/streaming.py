"""Read arbitrarily long input at constant memory, then continue it.

A FAM model's `FAMCache` has a fixed size, so a stream of any length is consumed chunk by chunk:

```python
>>> state = stream_text_file(model, tokenizer, "book.txt")           # millions of tokens, constant memory
>>> state.tokens, state.last_logits.shape
(1843211, torch.Size([1, 32000]))
>>> new_ids = continue_stream(model, state, max_new_tokens=100)      # generate() from the stream
```
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from ..modeling.fam_cache import FAMCache
from ..modeling.fam_compat import CACHE_KWARG
from ..modeling.fam_settings import DEFAULT_CHUNK_TOKENS


@dataclass
class StreamState:
    """Where a stream stands.

    Attributes:
        cache: the FAMCache after every token but `pending`.
        tokens: tokens consumed so far, `pending` included.
        pending: (B, 1) the last token, held back so that `continue_stream` can hand it to `generate()`.
        last_logits: (B, vocab) logits predicting the token after `pending` (None if `keep_logits` was off).
    """

    cache: FAMCache | None
    tokens: int
    pending: torch.Tensor | None
    last_logits: torch.Tensor | None


def _as_ids(chunk, device) -> torch.Tensor:
    ids = torch.as_tensor(chunk, dtype=torch.long, device=device)
    return ids[None] if ids.dim() == 1 else ids


@torch.no_grad()
def stream(
    model,
    chunks: Iterable,
    *,
    state: StreamState | None = None,
    total: int | None = None,
    progress: bool = False,
    keep_logits: bool = True,
) -> StreamState:
    """Feed token chunks (tensors or lists of ids, (n,) or (B, n)) through a FAM model.

    Args:
        model: a FAM model (FAMForCausalLM or a patched model).
        chunks: any iterable of token chunks; chunk sizes may vary.
        state: a previous StreamState to continue.
        total: total tokens, for the progress bar.
        progress: show a tqdm progress bar over tokens (on stderr).
        keep_logits: compute the logits of the last token (one vocabulary row, not per token).

    Returns:
        The new StreamState.
    """
    device = next(model.parameters()).device
    state = state or StreamState(cache=None, tokens=0, pending=None, last_logits=None)
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=total, unit="tok", unit_scale=True, desc="reading", leave=False)
    try:
        for chunk in chunks:
            ids = _as_ids(chunk, device)
            n_new = ids.shape[-1]
            if n_new == 0:
                continue
            if state.pending is not None:
                ids = torch.cat([state.pending, ids], dim=1)
            feed, state.pending = ids[:, :-1], ids[:, -1:]
            if feed.shape[1] > 0:
                state.cache = model(feed, cache=state.cache, use_cache=True, logits_to_keep=1).cache
            state.tokens += n_new
            if bar is not None:
                bar.update(n_new)
        # the pending token's logits predict what follows the stream
        if keep_logits and state.pending is not None:
            snapshot = _copy_cache(state.cache)
            out = model(state.pending, cache=snapshot, use_cache=True, logits_to_keep=1)
            state.last_logits = out.logits[:, -1]
    finally:
        if bar is not None:
            bar.close()
    return state


def _copy_cache(cache: FAMCache | None) -> FAMCache | None:
    """An independent copy (decoding writes new tokens into the cache's buffers in place)."""
    import copy

    return None if cache is None else copy.deepcopy(cache)


def iter_text_file_tokens(tokenizer, path: str | os.PathLike, *, chunk_tokens: int = DEFAULT_CHUNK_TOKENS,
                          read_chars: int = 1 << 20, add_bos: bool = True) -> Iterator[list[int]]:
    """Tokenize a text file of any size, piece by piece, yielding lists of at most `chunk_tokens` ids.

    The file is read `read_chars` characters at a time and each piece is cut after its last whitespace,
    so words are not split between pieces (tokenizers may still merge differently across a cut than in
    one pass over the whole text; the difference is a handful of tokens per megabyte).
    """
    buffer: list[int] = [tokenizer.bos_token_id] if add_bos and tokenizer.bos_token_id is not None else []
    carry = ""
    with open(path, encoding="utf-8", errors="replace") as f:
        while True:
            text = f.read(read_chars)
            at_end = not text
            text = carry + text
            if not at_end:
                cut = max(text.rfind(" "), text.rfind("\n"))
                cut = len(text) if cut <= 0 else cut
                text, carry = text[:cut], text[cut:]
            else:
                carry = ""
            if text:
                buffer.extend(tokenizer(text, add_special_tokens=False)["input_ids"])
            while len(buffer) >= chunk_tokens:
                yield buffer[:chunk_tokens]
                buffer = buffer[chunk_tokens:]
            if at_end:
                break
    if buffer:
        yield buffer


def count_text_file_tokens_estimate(path: str | os.PathLike, chars_per_token: float = 4.0) -> int:
    """A cheap estimate of a file's token count, for progress bars."""
    return int(Path(path).stat().st_size / chars_per_token)


def stream_text_file(model, tokenizer, path: str | os.PathLike, *, chunk_tokens: int = DEFAULT_CHUNK_TOKENS,
                     progress: bool = False) -> StreamState:
    """Stream a text file of any length through a FAM model (see `stream`)."""
    chunks = iter_text_file_tokens(tokenizer, path, chunk_tokens=chunk_tokens)
    total = count_text_file_tokens_estimate(path) if progress else None
    return stream(model, chunks, total=total, progress=progress)


def continue_stream(model, state: StreamState, *, max_new_tokens: int = 64, streamer=None,
                    **generate_kwargs) -> torch.Tensor:
    """Generate a continuation of a stream with `model.generate()` (all decoding options work).

    The stream's cache is consumed (copy it first to branch). Returns the new token ids (B, k).
    """
    if state.pending is None:
        raise ValueError("The stream is empty: feed it some tokens first.")
    batch = state.pending.shape[0]
    consumed = state.cache.get_seq_length() if state.cache is not None else 0
    # generate() wants the mask over everything the cache has seen plus the new input
    attention_mask = torch.ones(batch, consumed + 1, dtype=torch.long, device=state.pending.device)
    kwargs = dict(generate_kwargs)
    if state.cache is not None:
        kwargs[CACHE_KWARG] = state.cache  # the name generate() takes a cache under
    out = model.generate(
        state.pending, attention_mask=attention_mask, max_new_tokens=max_new_tokens, streamer=streamer, **kwargs
    )
    return out[:, 1:]
