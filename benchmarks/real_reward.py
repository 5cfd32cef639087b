"""A real checkpoint as a FAM reward model, through TRL's RewardTrainer: does the client path train it?

A FAM checkpoint loads as `AutoModelForSequenceClassification` (FAMForSequenceClassification, a new `score`) and
TRL's `RewardTrainer` trains it on preference pairs: a passage of Python's own documentation (`pydoc_data.topics`,
offline everywhere) against the same words shuffled, each passage longer than the attention window. Reported:
the held-out pairs' accuracy (chosen scored above rejected) and Bradley-Terry loss before and after training, the
training time, and that a padded batch scores each row as it scores alone. This checks the client path on a real
model, not the memory: the last block alone tells coherent text from shuffled words.

Usage (SmolLM2-135M-Instruct converted, docs/gguf.md; CPU, ~40 s a step at 2 pairs of ~1000 tokens):
    python benchmarks/real_reward.py --model /work/models/smollm2-fam --steps 20 \
        --out benchmarks/results/real_reward.json
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def passages(words_each: int, count: int) -> list[str]:
    from pydoc_data.topics import topics

    words = " ".join(topics[key] for key in sorted(topics)).split()
    found = [" ".join(words[i : i + words_each]) for i in range(0, len(words) - words_each, words_each)]
    random.Random(0).shuffle(found)
    return found[:count]


def shuffled(text: str, seed: int) -> str:
    words = text.split()
    random.Random(seed).shuffle(words)
    return " ".join(words)


def rewards(model, tokenizer, texts: list[str]) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return torch.tensor([model(**tokenizer(t, return_tensors="pt")).logits.item() for t in texts])


def held_out(model, tokenizer, pairs: list[dict]) -> dict:
    chosen = rewards(model, tokenizer, [p["chosen"] for p in pairs])
    rejected = rewards(model, tokenizer, [p["rejected"] for p in pairs])
    loss = -torch.nn.functional.logsigmoid(chosen - rejected).mean().item()
    return {"accuracy": (chosen > rejected).float().mean().item(), "loss": loss}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="a FAM checkpoint folder (with its tokenizer)")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--words", type=int, default=450, help="words per passage")
    parser.add_argument("--train-pairs", type=int, default=48)
    parser.add_argument("--heldout-pairs", type=int, default=16)
    parser.add_argument("--lr", type=float, default=2e-5)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)

    import trl
    from datasets import Dataset
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    import hf_fam  # noqa: F401  # registers the FAM classes

    torch.manual_seed(0)
    texts = passages(args.words, args.train_pairs + args.heldout_pairs)
    pairs = [{"chosen": t, "rejected": shuffled(t, i)} for i, t in enumerate(texts)]
    train, heldout = pairs[: args.train_pairs], pairs[args.train_pairs :]
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForSequenceClassification.from_pretrained(args.model, num_labels=1, dtype=torch.float32)
    model.config.pad_token_id = tokenizer.pad_token_id
    tokens = [len(tokenizer(p["chosen"])["input_ids"]) for p in heldout]
    print(f"{type(model).__name__}: window {model.config.attention_window} tokens; held-out passages "
          f"{min(tokens)}-{max(tokens)} tokens")

    rows = [heldout[0]["chosen"], heldout[1]["rejected"][: len(heldout[1]["rejected"]) // 3]]
    with torch.no_grad():
        batched = model.eval()(**tokenizer(rows, return_tensors="pt", padding=True)).logits.squeeze(-1)
    padding_diff = (batched - rewards(model, tokenizer, rows)).abs().max().item()
    before = held_out(model, tokenizer, heldout)
    print(f"padded batch vs rows alone: {padding_diff:.1e}; held-out before: {before}")

    with tempfile.TemporaryDirectory() as tmp:
        config = trl.RewardConfig(output_dir=tmp, max_steps=args.steps, per_device_train_batch_size=2,
                                  learning_rate=args.lr, max_length=2048, logging_steps=5, save_strategy="no",
                                  report_to=[], use_cpu=not torch.cuda.is_available(), bf16=False, seed=0)
        trainer = trl.RewardTrainer(model=model, args=config, train_dataset=Dataset.from_list(train),
                                    processing_class=tokenizer)
        start = time.perf_counter()
        trainer.train()
        seconds = time.perf_counter() - start
    after = held_out(model, tokenizer, heldout)
    print(f"held-out after {args.steps} steps ({seconds:.0f} s): {after}")
    result = {
        "model": str(args.model), "settings": {k: getattr(model.config, k) for k in ("block_size", "memory_segments",
                                                                                      "fam_length")},
        "steps": args.steps, "pairs_per_step": 2, "lr": args.lr, "heldout_pairs": len(heldout),
        "heldout_tokens": [min(tokens), max(tokens)], "padded_vs_alone": padding_diff, "before": before,
        "after": after, "train_seconds": round(seconds, 1),
        "train_loss": [h["loss"] for h in trainer.state.log_history if "loss" in h],
        "torch": torch.__version__, "trl": trl.__version__, "machine": platform.machine(),
        "threads": torch.get_num_threads(),
    }
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()
