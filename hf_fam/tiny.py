"""Tiny checkpoints made locally: a small random decoder plus a byte-level tokenizer, saved with
`save_pretrained` in the same file layout the Hub serves.

They stand in for Hub models wherever no hub is reachable: the tests, the README examples, the notebooks'
default path and the CPU demo.

Example:
```python
>>> from hf_fam.tiny import make_tiny_checkpoint
>>> path = make_tiny_checkpoint("/tmp/tiny-llama", family="llama")
>>> model = AutoModelForCausalLM.from_pretrained(path)
```
"""

from __future__ import annotations

from pathlib import Path

TINY_DEFAULTS = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    max_position_embeddings=4096,
)

SPECIAL_TOKENS = ("<pad>", "<s>", "</s>")


def byte_tokenizer():
    """A byte-level tokenizer (ids 0-2 special, then the 256 bytes): encodes any text, needs no training."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    byte_vocab = pre_tokenizers.ByteLevel.alphabet()  # the 256 printable stand-ins for bytes
    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}
    for ch in sorted(byte_vocab):
        vocab[ch] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>", padding_side="left"
    )


def make_tiny_checkpoint(
    path: str | Path,
    family: str = "llama",
    seed: int = 0,
    with_tokenizer: bool = True,
    safe_serialization_max_shard_size: str | None = None,
    **config_overrides,
) -> Path:
    """Build a tiny random `family` causal LM (and tokenizer) and save it to `path`.

    Args:
        path: output folder (created).
        family: a transformers model_type ("llama", "mistral", "gemma", ...).
        seed: weights are deterministic for a seed.
        with_tokenizer: also save the byte-level tokenizer.
        safe_serialization_max_shard_size: e.g. "50KB" to write a sharded checkpoint with an index.
        config_overrides: fields of the config (hidden_size, num_hidden_layers, ...).

    Returns:
        The folder, as a Path.
    """
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    path = Path(path)
    tokenizer = byte_tokenizer()
    kwargs = {**TINY_DEFAULTS, "vocab_size": len(tokenizer), **config_overrides}
    kwargs.setdefault("pad_token_id", tokenizer.pad_token_id)
    kwargs.setdefault("bos_token_id", tokenizer.bos_token_id)
    kwargs.setdefault("eos_token_id", tokenizer.eos_token_id)
    if family == "mistral":
        kwargs.setdefault("sliding_window", None)
    config = AutoConfig.for_model(family, **kwargs)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    save_kwargs = {}
    if safe_serialization_max_shard_size:
        save_kwargs["max_shard_size"] = safe_serialization_max_shard_size
    model.save_pretrained(path, **save_kwargs)
    if with_tokenizer:
        tokenizer.save_pretrained(path)
    return path
