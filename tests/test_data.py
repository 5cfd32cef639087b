"""Packing text files into fixed-length training sequences, and the padding collator."""

from __future__ import annotations

import json

import pytest
import torch

from hf_fam.tiny import byte_tokenizer
from hf_fam.training import FAMDataCollator, load_text_dataset, pack_dataset
from hf_fam.training.data import IGNORE_INDEX

DOCS = [f"Document {i}. " + "word " * (5 + 7 * i) for i in range(12)]


@pytest.fixture(scope="module")
def tokenizer():
    return byte_tokenizer()


@pytest.fixture
def corpus(tmp_path):
    folder = tmp_path / "corpus"
    folder.mkdir()
    for i, doc in enumerate(DOCS[:6]):
        (folder / f"doc{i}.txt").write_text(doc)
    with (tmp_path / "more.jsonl").open("w") as f:
        for doc in DOCS[6:]:
            f.write(json.dumps({"body": doc, "id": 1}) + "\n")
    return folder, tmp_path / "more.jsonl"


def test_text_files_are_documents_and_jsonl_rows_too(corpus, tmp_path):
    folder, jsonl = corpus
    docs = load_text_dataset([folder, jsonl], text_column="body", cache_dir=str(tmp_path / "cache"))
    assert docs.column_names == ["body"]
    assert sorted(docs["body"]) == sorted(DOCS)  # a .txt file is one document, not one per line


def test_packing_is_exact_deterministic_and_joins_documents_with_eos(corpus, tokenizer, tmp_path):
    folder, jsonl = corpus
    docs = load_text_dataset([folder, jsonl], text_column="body", cache_dir=str(tmp_path / "cache"))
    packed = pack_dataset(docs, tokenizer, seq_len=32, text_column="body", block_size=8, seed=1)
    total = sum(len(tokenizer(d)["input_ids"]) + 1 for d in DOCS)
    assert len(packed) == total // 32
    assert all(len(row) == 32 for row in packed["input_ids"])
    assert packed["labels"] == packed["input_ids"]
    flat = [t for row in packed["input_ids"] for t in row]
    assert flat.count(tokenizer.eos_token_id) >= len(DOCS) - 1
    # a sequence spans documents (no per-document masking, as in the paper)
    assert any(tokenizer.eos_token_id in row[:-1] for row in packed["input_ids"])
    again = pack_dataset(docs, tokenizer, seq_len=32, text_column="body", block_size=8, seed=1)
    assert again["input_ids"] == packed["input_ids"]
    other = pack_dataset(docs, tokenizer, seq_len=32, text_column="body", block_size=8, seed=2)
    assert other["input_ids"] != packed["input_ids"]


def test_seq_len_must_be_a_multiple_of_the_block_size(tokenizer):
    import datasets

    docs = datasets.Dataset.from_dict({"text": DOCS})
    needle = r"seq_len 100 is not a multiple of the model's block_size 32.*--seq-len 96 or 128"
    with pytest.raises(ValueError, match=needle):
        pack_dataset(docs, tokenizer, seq_len=100, block_size=32)


def test_missing_text_column_names_the_columns_and_the_fix(corpus, tokenizer, tmp_path):
    _, jsonl = corpus
    with pytest.raises(ValueError, match=r"has no text column 'text' \(its columns: body, id\); name the column .*"
                                         r"--text-column NAME"):
        load_text_dataset([jsonl], cache_dir=str(tmp_path / "cache"))
    import datasets

    with pytest.raises(ValueError, match="has no text column 'content'"):
        pack_dataset(datasets.Dataset.from_dict({"text": DOCS}), tokenizer, seq_len=16, text_column="content")


def test_saved_dataset_folder_and_bad_paths(tmp_path, tokenizer):
    import datasets

    datasets.Dataset.from_dict({"content": DOCS, "n": list(range(len(DOCS)))}).save_to_disk(tmp_path / "saved")
    docs = load_text_dataset(tmp_path / "saved", text_column="content")
    assert docs.column_names == ["content"] and len(docs) == len(DOCS)
    with pytest.raises(FileNotFoundError, match="text data not found"):
        load_text_dataset(tmp_path / "missing.txt")
    (tmp_path / "x.docx").write_text("?")
    with pytest.raises(ValueError, match=r"unknown file type '.docx'"):
        load_text_dataset(tmp_path / "x.docx")
    with pytest.raises(ValueError, match=r"fewer than one sequence of seq_len 4096"):
        pack_dataset(docs, tokenizer, seq_len=4096, text_column="content")


def test_collator_pads_right_with_ignored_labels():
    collate = FAMDataCollator(pad_token_id=0)
    batch = collate([{"input_ids": [5, 6, 7], "labels": [-100, 6, 7], "key_position": 1}, {"input_ids": [8]}])
    assert set(batch) == {"input_ids", "attention_mask", "labels"}
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["labels"].tolist() == [[-100, 6, 7], [8, IGNORE_INDEX, IGNORE_INDEX]]
    left = FAMDataCollator(pad_token_id=0, padding_side="left")([{"input_ids": [1, 2]}, {"input_ids": [3]}])
    assert left["input_ids"].tolist() == [[1, 2], [0, 3]] and left["attention_mask"].dtype == torch.long
    with pytest.raises(ValueError, match="padding_side must be 'right' or 'left'"):
        FAMDataCollator(padding_side="middle")


def test_mix_keeps_every_task_example_and_adds_text_to_the_fraction(corpus, tokenizer, tmp_path):
    from hf_fam.tasks.passkey import PasskeyConfig, passkey_dataset
    from hf_fam.training import mix_datasets

    folder, jsonl = corpus
    docs = load_text_dataset([folder, jsonl], text_column="body", cache_dir=str(tmp_path / "cache"))
    text = pack_dataset(docs, tokenizer, seq_len=32, text_column="body", block_size=8, seed=1)
    task = passkey_dataset(PasskeyConfig(num_examples=3 * len(text), seq_len=40, form="synthetic"))
    mixed = mix_datasets(task, text, 0.25, seed=0)
    assert mixed.column_names == ["input_ids", "labels"]
    assert len(mixed) == 4 * len(text)  # 3n task rows and n text rows: a quarter text
    rows = sorted(zip(mixed["input_ids"], mixed["labels"]))
    expected = sorted(list(zip(task["input_ids"], task["labels"])) + list(zip(text["input_ids"], text["labels"])))
    assert rows == expected  # nothing lost or duplicated; the task keeps its answer-only labels
    assert mixed["input_ids"][: len(task)] != task["input_ids"]  # shuffled together
    assert mix_datasets(task, text, 0.25, seed=0)["input_ids"] == mixed["input_ids"]
    more = mix_datasets(task, text, 0.75, seed=0)  # more text than there is: repeated from the start
    assert len(more) == 4 * len(task) and sum(row in text["input_ids"] for row in more["input_ids"]) == 3 * len(task)
    for bad in (0, 1, 1.5, True):
        with pytest.raises(ValueError, match="text_fraction must be in"):
            mix_datasets(task, text, bad)
