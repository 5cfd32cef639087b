"""Long-context training data: text files packed into fixed-length token sequences, and a padding collator.

The paper (§3.1.1) packs its data into 8.5k-token sequences *without* a per-document attention mask ("Attention
occurs causally within the window, regardless of the segment"), so a FAM model learns to carry its memory
across document boundaries. `pack_dataset` does the same: documents are tokenized, joined with the EOS token
and cut into sequences of exactly `seq_len` tokens (`labels` = `input_ids`; the model shifts them).

For a FAM model `seq_len` should be a multiple of the block size C: every block of a training sequence then
holds C tokens, as at inference, and the final memory that Random State Passing hands on has read the whole
sequence (a trailing partial block is never compressed into it). `pack_dataset(..., block_size=C)` enforces it.

The synthetic passkey task lives in `hf_fam.tasks.passkey`.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from itertools import chain
from pathlib import Path

import torch

from ..tasks import IGNORE_INDEX

TEXT_SUFFIXES = {".txt": "text", ".text": "text", ".md": "text", ".json": "json", ".jsonl": "json",
                 ".csv": "csv", ".parquet": "parquet"}
# documents are grouped this many at a time before cutting; tokens left over in a group (< seq_len) are dropped
PACKING_GROUP = 1000


def check_text_column(dataset, text_column: str, source: str = "the dataset") -> None:
    """Raise a ValueError naming the missing column, the columns there are, and the fix."""
    columns = list(dataset.column_names)
    if text_column not in columns:
        raise ValueError(
            f"{source} has no text column {text_column!r} (its columns: {', '.join(columns) or 'none'}); "
            "name the column that holds the text with --text-column NAME (text_column=NAME)."
        )


def check_seq_len(seq_len: int, block_size: int | None) -> None:
    """Packed sequences must be a whole number of FAM blocks (see the module docstring)."""
    if isinstance(seq_len, bool) or not isinstance(seq_len, int) or seq_len < 2:
        raise ValueError(f"seq_len must be an integer >= 2, got {seq_len!r}")
    if block_size and seq_len % block_size:
        lower = seq_len // block_size * block_size
        upper = lower + block_size
        hint = f"{upper}" if lower == 0 else f"{lower} or {upper}"
        raise ValueError(
            f"seq_len {seq_len} is not a multiple of the model's block_size {block_size}: the last block would be "
            f"partial and Random State Passing would skip it; use --seq-len {hint}."
        )


def _expand(paths: Iterable[str | Path]) -> list[Path]:
    files: list[Path] = []
    for raw in paths:
        path = Path(raw)
        if not path.exists():
            raise FileNotFoundError(f"text data not found: {path}")
        if path.is_dir():
            found = sorted(p for p in path.rglob("*") if p.suffix.lower() in TEXT_SUFFIXES and p.is_file())
            if not found:
                raise ValueError(
                    f"{path} holds no text files ({', '.join(sorted(TEXT_SUFFIXES))}) and is not a saved dataset."
                )
            files += found
        else:
            if path.suffix.lower() not in TEXT_SUFFIXES:
                raise ValueError(
                    f"{path}: unknown file type {path.suffix!r}; use one of {', '.join(sorted(TEXT_SUFFIXES))} "
                    "or a folder written by Dataset.save_to_disk."
                )
            files.append(path)
    if not files:
        raise ValueError("no text files given.")
    return files


def _is_saved_dataset(path: str | Path) -> bool:
    """Whether `path` is a folder written by `datasets.Dataset.save_to_disk` (or a DatasetDict's)."""
    path = Path(path)
    return path.is_dir() and ((path / "dataset_info.json").exists() or (path / "dataset_dict.json").exists())


def check_text_files(options) -> None:
    """Refuse text data `load_text_dataset` would refuse for its paths alone (missing, a folder without text
    files, an unknown file type), before anything heavy loads: a run stops on a typo in a second, not after the
    model has loaded. `options`: a `DataOptions`."""
    if options.source == "passkey" or not options.text_files:
        return
    paths = list(options.text_files)
    if not (len(paths) == 1 and _is_saved_dataset(paths[0])):
        _expand(paths)


def load_text_dataset(
    paths: Iterable[str | Path] | str | Path, text_column: str = "text", cache_dir: str | None = None
):
    """Load documents from text files (one document per .txt/.md file) or from json/jsonl/csv/parquet rows.

    Args:
        paths: files, folders of such files, or one folder written by `datasets.Dataset.save_to_disk`.
        text_column: the column holding the text in json/csv/parquet files and saved datasets.
        cache_dir: `datasets` cache folder (default: the usual HF cache).

    Returns:
        A `datasets.Dataset` with one column, `text_column`, one row per document.

    Example:
    ```python
    >>> docs = load_text_dataset(["books/"], text_column="text")
    >>> train = pack_dataset(docs, tokenizer, seq_len=8192, block_size=1024)
    ```
    """
    import datasets

    if isinstance(paths, (str, Path)):
        paths = [paths]
    paths = list(paths)
    if len(paths) == 1 and _is_saved_dataset(paths[0]):
        loaded = datasets.load_from_disk(str(paths[0]))
        if isinstance(loaded, datasets.DatasetDict):
            if "train" not in loaded:
                raise ValueError(f"{paths[0]} holds splits {', '.join(loaded)}, none named 'train'.")
            loaded = loaded["train"]
        check_text_column(loaded, text_column, str(paths[0]))
        return loaded.select_columns([text_column])

    parts = []
    by_builder: dict[str, list[str]] = {}
    for path in _expand(paths):
        by_builder.setdefault(TEXT_SUFFIXES[path.suffix.lower()], []).append(str(path))
    for builder, files in sorted(by_builder.items()):
        kwargs = {"sample_by": "document"} if builder == "text" else {}
        part = datasets.load_dataset(builder, data_files=files, split="train", cache_dir=cache_dir, **kwargs)
        column = "text" if builder == "text" else text_column
        check_text_column(part, column, f"{', '.join(files)}")
        part = part.select_columns([column])
        if column != text_column:
            part = part.rename_column(column, text_column)
        parts.append(part)
    return parts[0] if len(parts) == 1 else datasets.concatenate_datasets(parts)


def pack_dataset(
    dataset,
    tokenizer,
    seq_len: int,
    *,
    text_column: str = "text",
    block_size: int | None = None,
    shuffle: bool = True,
    seed: int = 0,
    num_proc: int | None = None,
):
    """Tokenize documents and cut them into training sequences of exactly `seq_len` tokens.

    Documents (shuffled with `seed` when `shuffle`) are tokenized with the tokenizer's special tokens, an EOS is
    appended to each, they are concatenated in groups of 1,000 and cut into `seq_len` pieces; the tail of each
    group that does not fill a sequence is dropped. The result is deterministic for a seed.

    Args:
        dataset: a `datasets.Dataset` with a `text_column`.
        tokenizer: any HF tokenizer.
        seq_len: tokens per training sequence.
        text_column: the column holding the text.
        block_size: the FAM block size C; `seq_len` must then be a multiple of it.
        shuffle, seed: document order.
        num_proc: worker processes for tokenization.

    Returns:
        A `datasets.Dataset` with `input_ids` and `labels` (equal), each a list of `seq_len` ids.

    Example:
    ```python
    >>> train = pack_dataset(load_text_dataset("corpus.jsonl"), tokenizer, seq_len=4096, block_size=1024)
    >>> len(train[0]["input_ids"])
    4096
    ```
    """
    check_seq_len(seq_len, block_size)
    check_text_column(dataset, text_column)
    if shuffle:
        dataset = dataset.shuffle(seed=seed)
    eos = tokenizer.eos_token_id

    def tokenize(batch):
        encoded = tokenizer(batch[text_column], add_special_tokens=True, verbose=False)["input_ids"]
        if eos is not None:
            encoded = [ids if ids and ids[-1] == eos else ids + [eos] for ids in encoded]
        return {"input_ids": encoded}

    def group(batch):
        tokens = list(chain.from_iterable(batch["input_ids"]))
        usable = len(tokens) // seq_len * seq_len
        chunks = [tokens[i : i + seq_len] for i in range(0, usable, seq_len)]
        return {"input_ids": chunks, "labels": [list(c) for c in chunks]}

    tokenized = dataset.map(tokenize, batched=True, remove_columns=dataset.column_names, num_proc=num_proc,
                            desc="Tokenizing")
    packed = tokenized.map(group, batched=True, batch_size=PACKING_GROUP, remove_columns=tokenized.column_names,
                           desc="Packing")
    if len(packed) == 0:
        total = sum(len(ids) for ids in tokenized["input_ids"])
        raise ValueError(
            f"the text holds {total} tokens, fewer than one sequence of seq_len {seq_len}; "
            "add text or lower --seq-len."
        )
    return packed


def mix_datasets(task, text, text_fraction: float, *, seed: int = 0):
    """Shuffle a task's examples (e.g. passkey) together with packed text sequences.

    Every task example is kept; text sequences are added so that they make `text_fraction` of the result
    (taken in order, and repeated from the start when the text holds fewer). Fine-tuning on a task alone
    teaches it at the cost of language modelling (measured on SmolLM2-135M with passkey-only LoRA: perplexity
    of held-out text in the millions); the text keeps the model a language model while it learns the task.

    Args:
        task: a `datasets.Dataset` with `input_ids` and `labels` (other columns are dropped).
        text: a `datasets.Dataset` from `pack_dataset`.
        text_fraction: share of text sequences in the result, in (0, 1).
        seed: order of the shuffled result.

    Returns:
        A `datasets.Dataset` with `input_ids` and `labels`, `len(task) / (1 - text_fraction)` rows (rounded).

    Example:
    ```python
    >>> train = mix_datasets(passkey_dataset(PasskeyConfig(num_examples=300), tokenizer), packed, 0.5)
    >>> len(train)
    600
    ```
    """
    import datasets

    if isinstance(text_fraction, bool) or not isinstance(text_fraction, (int, float)) or not 0 < text_fraction < 1:
        raise ValueError(f"text_fraction must be in (0, 1), got {text_fraction!r}")
    if len(task) == 0 or len(text) == 0:
        raise ValueError(f"cannot mix an empty dataset ({len(task)} task examples, {len(text)} text sequences).")
    n_text = max(1, round(len(task) * text_fraction / (1 - text_fraction)))
    columns = ["input_ids", "labels"]
    text = text.select_columns(columns).select([i % len(text) for i in range(n_text)])
    task = task.select_columns(columns).cast(text.features)
    return datasets.concatenate_datasets([task, text]).shuffle(seed=seed).flatten_indices()


@dataclass
class FAMDataCollator:
    """Stack examples into a batch, padding to the longest (real tokens first, `padding_side="right"`).

    Keeps only `input_ids`, `attention_mask` and `labels` (padding: attention 0, label -100); other columns
    (e.g. the passkey's `key_position`) are dropped. `labels` default to `input_ids` when an example has none.

    Example:
    ```python
    >>> loader = DataLoader(train, batch_size=8, collate_fn=FAMDataCollator(pad_token_id=tokenizer.pad_token_id))
    ```
    """

    pad_token_id: int = 0
    padding_side: str = "right"

    def __post_init__(self):
        if self.padding_side not in ("right", "left"):
            raise ValueError(f"padding_side must be 'right' or 'left', got {self.padding_side!r}")
        if self.pad_token_id is None:
            self.pad_token_id = 0  # masked out anyway

    def __call__(self, features: list[dict]) -> dict[str, torch.Tensor]:
        length = max(len(f["input_ids"]) for f in features)
        batch = {"input_ids": [], "attention_mask": [], "labels": []}
        for f in features:
            ids = list(f["input_ids"])
            labels = list(f["labels"]) if f.get("labels") is not None else list(ids)
            mask = list(f["attention_mask"]) if f.get("attention_mask") is not None else [1] * len(ids)
            pad = length - len(ids)
            if self.padding_side == "right":
                ids, mask, labels = ids + [self.pad_token_id] * pad, mask + [0] * pad, labels + [IGNORE_INDEX] * pad
            else:
                ids, mask, labels = [self.pad_token_id] * pad + ids, [0] * pad + mask, [IGNORE_INDEX] * pad + labels
            batch["input_ids"].append(ids)
            batch["attention_mask"].append(mask)
            batch["labels"].append(labels)
        return {key: torch.tensor(value, dtype=torch.long) for key, value in batch.items()}


def build_train_dataset(options, model, tokenizer, seed: int = 0):
    """The training dataset for `options` (a `DataOptions`: packed text, passkey, or both mixed), checked against
    the model."""
    if options.source == "text":
        return _text_dataset(options, model, tokenizer, seed)
    passkey = _passkey_dataset(options, model, tokenizer, seed)
    if options.source == "passkey":
        return passkey
    return mix_datasets(passkey, _text_dataset(options, model, tokenizer, seed), options.text_fraction, seed=seed)


def _text_dataset(options, model, tokenizer, seed: int):
    from .lora import unwrap_fam_model

    settings = unwrap_fam_model(model).fam_settings
    if tokenizer is None:
        raise ValueError(f"{options.text_files[0]}: text data needs a tokenizer, and the checkpoint has none.")
    check_seq_len(options.seq_len, settings.block_size)
    docs = load_text_dataset(options.text_files, text_column=options.text_column)
    return pack_dataset(docs, tokenizer, options.seq_len, text_column=options.text_column,
                        block_size=settings.block_size, seed=seed)


def _passkey_dataset(options, model, tokenizer, seed: int):
    from ..tasks.passkey import SyntheticPasskeyVocab, passkey_dataset

    vocab_size = model.get_input_embeddings().weight.shape[0]
    passkey = options.passkey_config(seed=seed)
    if passkey.form == "synthetic":
        needed = SyntheticPasskeyVocab(passkey.vocab_offset).size
        if needed > vocab_size:
            raise ValueError(f"the synthetic passkey uses token ids up to {needed - 1}, the model's vocabulary has "
                             f"{vocab_size}; lower --passkey-vocab-offset.")
    elif tokenizer is None:
        raise ValueError(
            "the text passkey needs a tokenizer and the checkpoint has none; use --passkey-form synthetic."
        )
    return passkey_dataset(passkey, tokenizer)


__all__ = ["IGNORE_INDEX", "FAMDataCollator", "build_train_dataset", "check_seq_len", "check_text_column",
           "load_text_dataset", "mix_datasets", "pack_dataset"]
