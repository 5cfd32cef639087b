"""The passkey evaluation's options (`PasskeyEvalConfig`), declared once for the Python API and `hf-fam eval`.

Each field's default is the default of both; its metadata holds the help text and, where the command line offers
it, the flag (read by `hf_fam.cli.fam_args.add_options`). The defaults suit a real checkpoint (the text form,
with its tokenizer); tiny models trained from scratch pass `form="synthetic"`. This module imports no torch, so
that `hf-fam eval --help` reads it in an instant.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ..modeling.fam_settings import DEFAULT_CHUNK_TOKENS
from ..tasks import PASSKEY_FORMS


@dataclass
class PasskeyEvalConfig:
    """What passkey evaluation to run."""

    lengths: list[int] = field(default_factory=lambda: [1024], metadata={"help": "Sequence lengths (tokens)."})
    trials: int = field(default=200, metadata={"help": "passkey: examples per length", "flag": "--trials"})
    depth: float | None = field(default=None, metadata={
        "help": "passkey: key depth in [0, 1] (default: random per example)", "flag": "--depth"})
    form: str = field(default="text", metadata={
        "help": "passkey: 'text' uses the tokenizer (real models); 'synthetic' a 33-token vocabulary",
        "flag": "--form", "choices": PASSKEY_FORMS})
    vocab_offset: int = field(default=0, metadata={
        "help": "passkey, synthetic form: first token id", "flag": "--vocab-offset"})
    key_digits: int = field(default=5, metadata={"help": "Digits of the pass key."})
    seed: int = field(default=1234, metadata={
        "help": "evaluation examples seed: example i of length n is a function of (seed, n, i)", "flag": "--seed"})
    batch_size: int = field(default=8, metadata={"help": "examples per forward", "flag": "--batch-size"})
    chunk_tokens: int = field(default=DEFAULT_CHUNK_TOKENS, metadata={
        "help": "tokens per forward when streaming (longer passkey examples, perplexity text)",
        "flag": "--chunk-tokens"})

    def __post_init__(self):
        if not self.lengths or any(not isinstance(n, int) or n < 2 * self.key_digits + 3 for n in self.lengths):
            raise ValueError(f"lengths must be integers >= {2 * self.key_digits + 3}, got {self.lengths!r}")
        if self.form not in PASSKEY_FORMS:
            raise ValueError(f"form must be one of {', '.join(PASSKEY_FORMS)}, got {self.form!r}")
        for name in ("trials", "batch_size", "chunk_tokens"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"{name} must be a positive integer, got {getattr(self, name)!r}")


__all__ = ["PasskeyEvalConfig"]
