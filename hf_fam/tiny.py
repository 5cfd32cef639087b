"""Tiny random decoders, the one builder behind the tests, the CPU demo, the benchmarks and the notebooks.

`tiny_config` and `tiny_model` build a small random causal LM of any supported family (hidden 64, 2 layers,
GQA 4/2 heads by default; every size can be overridden), deterministic for a seed. `make_tiny_checkpoint` saves
one with a byte-level tokenizer, with `save_pretrained`, in the same file layout the Hub serves: it stands in
for Hub models wherever no hub is reachable (the tests, the README examples, the notebooks' default path).

Example:
```python
>>> from hf_fam.tiny import make_tiny_checkpoint, tiny_model
>>> model = tiny_model("gemma", seed=1, num_hidden_layers=4).eval()
>>> path = make_tiny_checkpoint("/tmp/tiny-llama", family="llama")
>>> model = AutoModelForCausalLM.from_pretrained(path)
```
"""

from __future__ import annotations

from pathlib import Path

SPECIAL_TOKENS = ("<pad>", "<s>", "</s>")

# head_dim is not among them: it follows hidden_size / num_attention_heads, whatever sizes are given
TINY_DEFAULTS = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=4096,
    vocab_size=len(SPECIAL_TOKENS) + 256,  # the byte-level tokenizer's
)


def tiny_config(family: str = "llama", **overrides):
    """A tiny config of `family` (a transformers model_type): `TINY_DEFAULTS`, then `overrides`.

    `head_dim` is hidden_size / num_attention_heads unless given (Gemma's own default, 256, would dwarf a tiny
    model); Mistral gets no sliding window unless given; special token ids the family sets beyond the vocabulary
    become the byte tokenizer's (`SPECIAL_TOKENS`) unless given.
    """
    from transformers import AutoConfig

    kwargs = {**TINY_DEFAULTS, **overrides}
    kwargs.setdefault("head_dim", kwargs["hidden_size"] // kwargs["num_attention_heads"])
    if family == "mistral":
        kwargs.setdefault("sliding_window", None)
    config = AutoConfig.for_model(family, **kwargs)
    # a family's default special ids beyond the tiny vocabulary (GLM-4's 151329) become the byte tokenizer's
    for name, token in zip(("pad_token_id", "bos_token_id", "eos_token_id"), SPECIAL_TOKENS, strict=True):
        ids = getattr(config, name, None)
        if name not in overrides and any(i >= config.vocab_size for i in _as_ids(ids)):
            setattr(config, name, SPECIAL_TOKENS.index(token))
    return config


def _as_ids(ids) -> list[int]:
    return [] if ids is None else [ids] if isinstance(ids, int) else list(ids)


def tiny_model(family: str = "llama", seed: int = 0, *, attn: str | None = None, sharpen: float = 1.0, **overrides):
    """A tiny random causal LM of `family` in fp32 (training mode, as built), deterministic for `seed`.

    Args:
        family: a transformers model_type ("llama", "mistral", "gemma", ...).
        seed: the weights are the same for the same seed and sizes.
        attn: the attention implementation ("sdpa", "eager"); transformers' default when None.
        sharpen: scales the query and key projections, so that attention is far from uniform (with random
            weights, which keys are masked would otherwise barely change the output); 1 leaves them as drawn.
        overrides: fields of the config (see `tiny_config`).
    """
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    config = tiny_config(family, **overrides)
    if attn is not None:
        config._attn_implementation = attn
    model = AutoModelForCausalLM.from_config(config, **({"attn_implementation": attn} if attn else {}))
    if sharpen != 1.0:
        with torch.no_grad():
            for layer in model.model.layers:
                for name in ("q_proj", "k_proj", "qkv_proj"):  # qkv_proj: Phi-3's fused projection (v scaled too)
                    if hasattr(layer.self_attn, name):
                        getattr(layer.self_attn, name).weight.mul_(sharpen)
    return model


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
    path = Path(path)
    tokenizer = byte_tokenizer()
    kwargs = {"vocab_size": len(tokenizer), **config_overrides}
    kwargs.setdefault("pad_token_id", tokenizer.pad_token_id)
    kwargs.setdefault("bos_token_id", tokenizer.bos_token_id)
    kwargs.setdefault("eos_token_id", tokenizer.eos_token_id)
    model = tiny_model(family, seed, **kwargs)
    save_kwargs = {}
    if safe_serialization_max_shard_size:
        save_kwargs["max_shard_size"] = safe_serialization_max_shard_size
    model.save_pretrained(path, **save_kwargs)
    if with_tokenizer:
        tokenizer.save_pretrained(path)
    return path
