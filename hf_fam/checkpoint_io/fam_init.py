"""The initial memory `fam_init` (F × hidden) a converted checkpoint starts with.

A base checkpoint has no FAM weights; conversion adds `fam.fam_init`, the only new tensor of a FAM model.
Until the model is fine-tuned with FAM, this tensor decides what the memory holds before the first block.
Four starts are offered (`hf-fam convert --fam-init SPEC`):

- `bos` (default of `hf-fam convert` and `hf_fam.patch`): the BOS token's embedding row in every slot (the
  EOS token's when the checkpoint has no BOS token). Propagated through the layers, each slot is exactly the
  BOS token's hidden state at that layer: the state pretrained models use as their attention sink. With the
  zero-shot update mode (`fam_update="sink"`, see `FAMConfig`) the converted model reads it as a sink the
  window never loses, so it is usable before any training; fine-tuning starts from there.
- `random`: drawn like any new weight, normal with std `initializer_range`, from `--seed` (what
  `FAMForCausalLM.from_base_model` uses). Noise the base model never saw; fine-tuning learns it.
- `text:TEXT`: the token-embedding rows of TEXT's first F tokens (the text repeats when it has fewer than
  F tokens), stored as the embedding matrix holds them, unscaled. The model scales them at run time as
  it scales token embeddings (Gemma: × √hidden), so before any fine-tuning the memory starts as input the
  model knows, e.g. `text:Summary of the text so far:`. A start in the model's own input distribution,
  and a reproducible one.
- `file:PATH`: an (F, hidden) tensor from a `.safetensors` file (its only tensor, or `fam.fam_init`) or a
  `.pt` file (read with `weights_only=True`), e.g. a `fam_init` trained elsewhere.

Example:
```python
>>> spec = FamInitSpec.parse("text:Summary so far:")
>>> fam_init = build_fam_init(spec, fam_length=8, hidden_size=2048, dtype=torch.bfloat16,
...                           tokenizer_folder="Llama-3.2-1B", embedding_rows=read_rows)
```
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

KINDS = ("bos", "random", "text", "file")


@dataclass(frozen=True)
class FamInitSpec:
    """How to build `fam_init`: kind "random" (with `seed` and `std`), "text" or "file" (`value`)."""

    kind: str = "random"
    value: str | None = None
    seed: int = 0

    @classmethod
    def parse(cls, spec: str, seed: int = 0) -> FamInitSpec:
        """Parse `bos`, `random`, `text:TEXT` or `file:PATH`.

        Raises:
            ValueError: another form, or an empty text / path.
        """
        kind, sep, value = spec.partition(":")
        if kind in ("random", "bos") and not sep:
            return cls(kind, None, seed)
        if kind in ("text", "file") and sep:
            if not value:
                raise ValueError(f"--fam-init {kind}: needs a {'text' if kind == 'text' else 'path'} after the colon")
            return cls(kind, value, seed)
        raise ValueError(f"--fam-init {spec!r}: expected 'bos', 'random', 'text:TEXT' or 'file:PATH'")

    def describe(self, std: float | None = None) -> str:
        """One sentence for the model card."""
        if self.kind == "bos":
            return "the BOS token's embedding in every slot (the attention sink pretrained models use)"
        if self.kind == "random":
            spread = f"std {std:g}" if std is not None else "std initializer_range"
            return f"random normal ({spread}, seed {self.seed}), as for any new weight"
        if self.kind == "text":
            return f"the token embeddings of the text {self.value!r} (repeated to fill the F rows)"
        return f"the tensor in {Path(self.value).name}"


def build_fam_init(
    spec: FamInitSpec,
    *,
    fam_length: int,
    hidden_size: int,
    dtype: torch.dtype,
    std: float = 0.02,
    tokenizer_folder: str | Path | None = None,
    embedding_rows: Callable[[list[int]], torch.Tensor] | None = None,
    bos_token_id: int | None = None,
) -> torch.Tensor:
    """Build the (fam_length, hidden_size) initial FAM in `dtype`.

    Args:
        spec: what to build (see the module docstring).
        fam_length: F.
        hidden_size: the base model's hidden size.
        dtype: the dtype of the base checkpoint's embedding.
        std: standard deviation of the random start (the config's initializer_range).
        tokenizer_folder: where the tokenizer is, for `text:`.
        embedding_rows: reads rows of the embedding matrix: ids -> (len(ids), hidden), for `text:` and `bos`.
        bos_token_id: the token whose embedding `bos` repeats (see `sink_token_id`).

    Returns:
        A CPU tensor of shape (F, hidden_size).

    Raises:
        ValueError / FileNotFoundError: a text without tokens, no tokenizer, a file with another shape.
    """
    if spec.kind == "bos":
        if bos_token_id is None:
            raise ValueError("--fam-init bos: the checkpoint's config names no BOS or EOS token; "
                             "use --fam-init random or text:TEXT")
        return embedding_rows([bos_token_id])[0].expand(fam_length, hidden_size).clone().to(dtype)
    if spec.kind == "random":
        generator = torch.Generator().manual_seed(spec.seed)
        return (torch.randn(fam_length, hidden_size, generator=generator) * std).to(dtype)
    if spec.kind == "text":
        return _from_text(spec.value, fam_length, tokenizer_folder, embedding_rows).to(dtype)
    if spec.kind == "file":
        return _from_file(Path(spec.value), fam_length, hidden_size).to(dtype)
    raise ValueError(f"unknown fam_init kind {spec.kind!r}; expected one of {', '.join(KINDS)}")


def _from_text(text: str, fam_length: int, tokenizer_folder, embedding_rows) -> torch.Tensor:
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_folder))
    except Exception as err:  # transformers raises many kinds here; the user needs one line
        raise ValueError(
            f"--fam-init text: needs the checkpoint's tokenizer, which could not be loaded "
            f"({type(err).__name__}); use --fam-init random or file:PATH"
        ) from None
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if not ids:
        raise ValueError(f"--fam-init text: {text!r} has no tokens")
    ids = [ids[i % len(ids)] for i in range(fam_length)]  # the first F tokens, the text repeated if shorter
    unique = sorted(set(ids))
    rows = embedding_rows(unique)  # (len(unique), hidden)
    where = {token: i for i, token in enumerate(unique)}
    return rows[[where[token] for token in ids]] if ids else rows[:0]


def _from_file(path: Path, fam_length: int, hidden_size: int) -> torch.Tensor:
    if not path.is_file():
        raise FileNotFoundError(f"--fam-init file: {path} does not exist")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        tensors = load_file(str(path))
        if len(tensors) == 1:
            tensor = next(iter(tensors.values()))
        elif "fam.fam_init" in tensors:
            tensor = tensors["fam.fam_init"]
        else:
            raise ValueError(f"--fam-init file: {path.name} holds {len(tensors)} tensors and none is fam.fam_init")
    else:
        tensor = torch.load(path, map_location="cpu", weights_only=True)
        if isinstance(tensor, dict):
            tensor = tensor.get("fam.fam_init", tensor.get("fam_init"))
        if not isinstance(tensor, torch.Tensor):
            raise ValueError(f"--fam-init file: {path.name} holds no tensor (or a dict without 'fam_init')")
    if tuple(tensor.shape) != (fam_length, hidden_size):
        raise ValueError(
            f"--fam-init file: {path.name} holds shape {tuple(tensor.shape)}, the model needs "
            f"({fam_length}, {hidden_size}) = (fam_length, hidden_size)"
        )
    return tensor


def sink_token_id(config) -> int | None:
    """The token whose embedding the `bos` start repeats: the config's BOS token, else its (first) EOS token."""
    for name in ("bos_token_id", "eos_token_id"):
        value = getattr(config, name, None)
        if isinstance(value, (list, tuple)):
            value = value[0] if value else None
        if value is not None:
            return int(value)
    return None


def bos_fam_init(model, fam_length: int) -> torch.Tensor:
    """The `bos` start for a loaded model: (F, hidden) copies of its sink token's embedding row (unscaled)."""
    token = sink_token_id(model.config)
    weight = model.get_input_embeddings().weight
    return build_fam_init(FamInitSpec("bos"), fam_length=fam_length, hidden_size=weight.shape[1], dtype=weight.dtype,
                          embedding_rows=lambda ids: weight.detach()[ids], bos_token_id=token)


def training_fam_init(fam_init: torch.Tensor, tokenizer, embedding: torch.Tensor, text: str) -> torch.Tensor | None:
    """The memory training starts from when it begins at the `bos` start: slot 0 keeps the sink, slots 1..F-1
    take the token embeddings of `text` (repeated to fill them), so that they can carry content.

    Why: propagated through the layers, the BOS row becomes the attention sink, whose hidden state carries
    massive activations (SmolLM2-135M: norm about 25,000 at layer 15 against about 150 for other tokens).
    After each layer's normalisation, whatever an update writes into such a slot is lost in them, so a memory
    of F sink slots cannot learn to carry anything (docs/training.md, "Where training starts the memory").

    Args:
        fam_init: the current (F, D) initial memory.
        tokenizer: the checkpoint's tokenizer.
        embedding: the (V, D) token embedding matrix (rows as stored, unscaled, as `fam_init` is).
        text: the text whose tokens fill slots 1..F-1.

    Returns:
        The new (F, D) `fam_init`, or None when `fam_init` is not the `bos` start (its rows are not one repeated
        row: a trained or chosen memory is kept as it is), F < 2, or `text` has no tokens.
    """
    rows = fam_init.shape[0]
    if rows < 2 or not bool((fam_init == fam_init[:1]).all()):
        return None
    ids = tokenizer(text, add_special_tokens=False)["input_ids"] if text else []
    if not ids:
        return None
    new = fam_init.detach().clone()
    new[1:] = embedding.detach()[[ids[i % len(ids)] for i in range(rows - 1)]].to(new.dtype)
    return new
