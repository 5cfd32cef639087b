"""Synthetic passkey retrieval (paper §3.2, after Landmark Attention): a key hidden in filler, asked for at the end.

Two forms of the same task, both deterministic for a seed (example `i` depends only on the seed and `i`):

- **text** (any HF tokenizer), in the paper's wording (Fig. 10):
  "There is an important info hidden inside a lot of irrelevant text. Find it and memorize them. I will quiz you
  about the important information there." + filler + " The pass key is 71432. Remember it. 71432 is the pass
  key." + filler + " What is the pass key? The pass key is" + answer " 71432". The filler is Landmark's five
  sentences ("The grass is green. The sky is blue. ..."), repeated; whole sentences only, so an example has at
  most `seq_len` tokens (a little fewer when a sentence does not fit).
- **synthetic** (for tiny models trained from scratch; a 33-token vocabulary, optionally offset): random filler
  symbols, `KEY d1..d5 ENDK` at the chosen depth, `QRY d1..d5` at the end; exactly `seq_len` tokens.

Every example carries `input_ids`, `labels` (-100 everywhere but on the answer tokens: the loss is on the answer
only), and what evaluation needs: `key_position` / `key_end` (token span of the inserted key), `prompt_length`
(the answer starts there: feed `input_ids[:prompt_length]` to `generate`), `seq_len`, `passkey` and `depth`.
`beyond_reach` tells whether a key lies outside what block sliding window attention could ever see.

Example:
```python
>>> data = passkey_dataset(PasskeyConfig(num_examples=100, seq_len=2048, depth=0.0), tokenizer)
>>> row = data[0]; tokenizer.decode(row["input_ids"][row["prompt_length"]:])
' 71432'
```
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

import torch

from . import IGNORE_INDEX, PASSKEY_FILLER, PASSKEY_FORMS

PASSKEY_INTRO = (
    "There is an important info hidden inside a lot of irrelevant text. Find it and memorize them. "
    "I will quiz you about the important information there."
)
PASSKEY_KEY = " The pass key is {key}. Remember it. {key} is the pass key."
PASSKEY_QUESTION = " What is the pass key? The pass key is"
PASSKEY_ANSWER = " {key}"


@dataclass(frozen=True)
class SyntheticPasskeyVocab:
    """Token ids of the synthetic form: 10 digits, `num_filler` filler symbols, then KEY, ENDK and QRY.

    All ids are shifted by `offset`, so the task can share a larger vocabulary (ids [offset, offset + size)).
    """

    offset: int = 0
    num_filler: int = 20

    def digit(self, d: int) -> int:
        return self.offset + d

    @property
    def filler(self) -> range:
        return range(self.offset + 10, self.offset + 10 + self.num_filler)

    @property
    def key(self) -> int:
        return self.offset + 10 + self.num_filler

    @property
    def end_key(self) -> int:
        return self.key + 1

    @property
    def query(self) -> int:
        return self.key + 2

    @property
    def size(self) -> int:
        """Smallest vocabulary size that holds every id (offset included)."""
        return self.query + 1

    def decode(self, ids) -> str:
        """Readable form, e.g. "f3 f17 KEY 7 1 4 3 2 ENDK f0 QRY 7 1 4 3 2"."""
        names = {self.key: "KEY", self.end_key: "ENDK", self.query: "QRY"}
        out = []
        for i in (ids.tolist() if isinstance(ids, torch.Tensor) else ids):
            if i in names:
                out.append(names[i])
            elif self.offset <= i < self.offset + 10:
                out.append(str(i - self.offset))
            elif i in self.filler:
                out.append(f"f{i - self.filler.start}")
            else:
                out.append(f"<{i}>")
        return " ".join(out)


@dataclass
class PasskeyConfig:
    """What passkey examples to make."""

    num_examples: int = field(default=1000, metadata={"help": "Number of examples."})
    seq_len: int = field(default=1024, metadata={"help": "Tokens per example, answer included (text form: at most)."})
    min_seq_len: int | None = field(
        default=None, metadata={"help": "When set, each example's length is uniform in [min_seq_len, seq_len]."}
    )
    depth: float | None = field(
        default=None,
        metadata={"help": "Where the key sits in the filler: 0 = right after the introduction (the paper), 1 = just "
                          "before the question; None = uniform at random per example."},
    )
    key_digits: int = field(default=5, metadata={"help": "Digits of the pass key."})
    form: str = field(default="text", metadata={"help": "'text' (any tokenizer) or 'synthetic' (33-token vocabulary)."})
    vocab_offset: int = field(default=0, metadata={"help": "Synthetic form: first token id used."})
    seed: int = field(default=0, metadata={"help": "Examples are a function of (seed, index)."})

    def __post_init__(self):
        for name in ("num_examples", "seq_len", "key_digits"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if self.min_seq_len is not None and (
            isinstance(self.min_seq_len, bool) or not isinstance(self.min_seq_len, int)
            or not 1 <= self.min_seq_len <= self.seq_len
        ):
            raise ValueError(f"min_seq_len must be an integer in [1, seq_len={self.seq_len}], got {self.min_seq_len!r}")
        if self.depth is not None and not (isinstance(self.depth, (int, float)) and 0.0 <= self.depth <= 1.0):
            raise ValueError(f"depth must be in [0, 1] or None (random), got {self.depth!r}")
        if self.form not in PASSKEY_FORMS:
            raise ValueError(f"form must be one of {', '.join(PASSKEY_FORMS)}, got {self.form!r}")
        if isinstance(self.vocab_offset, bool) or not isinstance(self.vocab_offset, int) or self.vocab_offset < 0:
            raise ValueError(f"vocab_offset must be a non-negative integer, got {self.vocab_offset!r}")
        if self.form == "synthetic":
            shortest = self.min_seq_len or self.seq_len
            needed = 2 * self.key_digits + 3
            if shortest < needed:
                raise ValueError(
                    f"synthetic passkey examples need seq_len >= {needed} (key and question), got {shortest}"
                )


def _example_rng(config: PasskeyConfig, index: int) -> random.Random:
    # string seeds hash with SHA-512: stable across processes and Python runs (unlike hash())
    return random.Random(f"hf_fam.passkey/{config.seed}/{index}")


def _draw(config: PasskeyConfig, index: int):
    rng = _example_rng(config, index)
    length = rng.randint(config.min_seq_len, config.seq_len) if config.min_seq_len else config.seq_len
    depth = config.depth if config.depth is not None else rng.random()
    key = str(rng.randint(10 ** (config.key_digits - 1), 10**config.key_digits - 1))
    return rng, length, depth, key


def _labels(ids: list[int], prompt_length: int) -> list[int]:
    return [IGNORE_INDEX] * prompt_length + ids[prompt_length:]


def synthetic_passkey_example(config: PasskeyConfig, index: int) -> dict:
    """Example `index` of the synthetic form (exactly `seq_len` tokens; see the module docstring)."""
    vocab = SyntheticPasskeyVocab(config.vocab_offset)
    rng, length, depth, key = _draw(config, index)
    digits = [vocab.digit(int(c)) for c in key]
    key_part = [vocab.key, *digits, vocab.end_key]
    question = [vocab.query]
    n_filler = length - len(key_part) - len(question) - len(digits)
    before = round(depth * n_filler)
    filler = [rng.choice(vocab.filler) for _ in range(n_filler)]
    ids = filler[:before] + key_part + filler[before:] + question + digits
    prompt_length = len(ids) - len(digits)
    return {
        "input_ids": ids,
        "labels": _labels(ids, prompt_length),
        "key_position": before,
        "key_end": before + len(key_part),
        "prompt_length": prompt_length,
        "seq_len": len(ids),
        "passkey": key,
        "depth": before / n_filler if n_filler else 0.0,
    }


class _TextPasskeyMaker:
    """Builds text-form examples for one tokenizer (measures the filler once)."""

    def __init__(self, tokenizer):
        if tokenizer is None:
            raise ValueError("the text passkey form needs a tokenizer; pass one, or use form='synthetic'.")
        if not getattr(tokenizer, "is_fast", False):
            raise ValueError("the text passkey form needs a fast tokenizer (offset mapping) to locate the key.")
        self.tokenizer = tokenizer
        probe = 10 * len(PASSKEY_FILLER)
        short = self._count(self._text("0", 0, 0))
        long = self._count(self._text("0", probe, 0))
        self.tokens_per_sentence = max(1e-6, (long - short) / probe)

    @staticmethod
    def _text(key: str, n_sentences: int, before: int) -> tuple[str, int, int]:
        """(prompt text, key start char, key end char) with `before` of `n_sentences` filler sentences first."""
        filler = [PASSKEY_FILLER[i % len(PASSKEY_FILLER)] for i in range(n_sentences)]
        head = PASSKEY_INTRO + "".join(filler[:before])
        key_text = PASSKEY_KEY.format(key=key)
        text = head + key_text + "".join(filler[before:]) + PASSKEY_QUESTION
        return text, len(head), len(head) + len(key_text)

    def _count(self, spec) -> int:
        return len(self.tokenizer(spec[0], add_special_tokens=True, verbose=False)["input_ids"])

    def _encode(self, key: str, n: int, depth: float):
        before = round(depth * n)
        text, k0, k1 = self._text(key, n, before)
        prompt = self.tokenizer(text, add_special_tokens=True, return_offsets_mapping=True, verbose=False)
        answer_text = PASSKEY_ANSWER.format(key=key)
        joint = self.tokenizer(text + answer_text, add_special_tokens=True, verbose=False)["input_ids"]
        p_ids = list(prompt["input_ids"])
        if joint[: len(p_ids)] == p_ids and len(joint) > len(p_ids):
            ids = list(joint)
        else:  # the answer merged with the prompt's last token: keep the prompt as a generator would see it
            ids = p_ids + self.tokenizer(answer_text, add_special_tokens=False, verbose=False)["input_ids"]
        spans = prompt["offset_mapping"]
        key_position = next(i for i, (s, e) in enumerate(spans) if e > k0 and e > s)
        key_end = next((i for i, (s, e) in enumerate(spans) if s >= k1 and e > s), len(spans))
        return ids, len(p_ids), key_position, key_end, (before / n if n else 0.0)

    def example(self, config: PasskeyConfig, index: int) -> dict:
        _, length, depth, key = _draw(config, index)
        fixed = self._count(self._text(key, 0, 0)) + 2 + config.key_digits  # + the answer, roughly
        n = max(0, int((length - fixed) / self.tokens_per_sentence))
        encoded = self._encode(key, n, depth)
        while len(encoded[0]) > length and n > 0:  # overshoot by a sentence or two at most
            n = max(0, n - max(1, int((len(encoded[0]) - length) / self.tokens_per_sentence)))
            encoded = self._encode(key, n, depth)
        while True:  # fill up with whole sentences
            bigger = self._encode(key, n + 1, depth)
            if len(bigger[0]) > length:
                break
            n, encoded = n + 1, bigger
        ids, prompt_length, key_position, key_end, actual_depth = encoded
        if len(ids) > length:
            raise ValueError(
                f"seq_len {length} is too short for the text passkey with this tokenizer: the introduction, key, "
                f"question and answer alone take {len(ids)} tokens; use --seq-len {len(ids)} or more."
            )
        return {
            "input_ids": ids,
            "labels": _labels(ids, prompt_length),
            "key_position": key_position,
            "key_end": key_end,
            "prompt_length": prompt_length,
            "seq_len": len(ids),
            "passkey": key,
            "depth": actual_depth,
        }


def passkey_examples(config: PasskeyConfig, tokenizer=None, indices=None):
    """Yield examples (dicts, see the module docstring) for `indices` (default: all `num_examples`).

    Args:
        config: what to make.
        tokenizer: any fast HF tokenizer; required for the text form, ignored by the synthetic form.
        indices: which examples; example `i` is the same whatever else is made.
    """
    indices = range(config.num_examples) if indices is None else indices
    if config.form == "synthetic":
        for i in indices:
            yield synthetic_passkey_example(config, i)
    else:
        maker = _TextPasskeyMaker(tokenizer)
        for i in indices:
            yield maker.example(config, i)


def passkey_dataset(config: PasskeyConfig, tokenizer=None):
    """A `datasets.Dataset` of `config.num_examples` passkey examples (in memory).

    Args:
        config: what to make.
        tokenizer: any fast HF tokenizer (text form).

    Returns:
        Columns `input_ids`, `labels`, `key_position`, `key_end`, `prompt_length`, `seq_len`, `passkey`, `depth`.

    Example:
    ```python
    >>> data = passkey_dataset(PasskeyConfig(num_examples=64, seq_len=256, form="synthetic"))
    >>> SyntheticPasskeyVocab().decode(data[0]["input_ids"][-6:])
    'QRY 7 1 4 3 2'
    ```
    """
    import datasets

    return datasets.Dataset.from_list(list(passkey_examples(config, tokenizer)))


def beyond_reach(key_end: int, prompt_length: int, *, block_size: int, memory_segments: int, num_layers: int) -> bool:
    """Whether block sliding window attention (no FAM) could not see any token of the key from the question.

    With BSWA a token attends to its own block and the M blocks before it; stacked over L layers, information
    travels at most L·M blocks back. The answer is predicted from position `prompt_length - 1`; the key's last
    token is `key_end - 1`. Blocks are counted from the example's first token.

    Args:
        key_end: one past the key's last token (an example's `key_end`).
        prompt_length: where the answer starts (an example's `prompt_length`).
        block_size, memory_segments, num_layers: C, M, L.

    Returns:
        True when the key is more than L·M blocks behind the question's block.
    """
    query_block = (prompt_length - 1) // block_size
    key_block = (key_end - 1) // block_size
    return query_block - key_block > num_layers * memory_segments


def passkey_exact_match(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per row, whether the greedy prediction of every answer token is right (teacher forcing).

    Args:
        logits: (B, N, V) from a forward over the whole example.
        labels: (B, N), -100 except on the answer tokens (as made here).

    Returns:
        (B,) bool.
    """
    pred = logits[:, :-1].argmax(-1)  # (B, N-1): prediction of token t+1
    target = labels[:, 1:]
    scored = target != IGNORE_INDEX
    return ((pred == target) | ~scored).all(dim=1) & scored.any(dim=1)


__all__ = [
    "PASSKEY_FORMS",
    "PasskeyConfig",
    "SyntheticPasskeyVocab",
    "beyond_reach",
    "passkey_dataset",
    "passkey_exact_match",
    "passkey_examples",
    "synthetic_passkey_example",
]
