"""A real checkpoint as a FAM token classifier: does the client path tag a long document exactly, in chunks?

A FAM checkpoint loads as `AutoModelForTokenClassification` (FAMForTokenClassification, a new random `score`).
On a passage of Python's own documentation (`pydoc_data.topics`, offline everywhere) several windows long,
reported: the scores of reading it at once against feeding it in chunks through one FAMCache (and the cache's size
after each chunk), with the paper's memory update (by default), and the token-classification pipeline's labels and
scores of a padded batch against each text alone. This checks the client path on a real model (30 layers, fp32 sums
over 1.5k tokens), not what a trained tagger learns.

Usage (SmolLM2-135M-Instruct converted, docs/gguf.md; CPU, under a minute):
    python benchmarks/real_token_classification.py --model /work/models/smollm2-fam \
        --out benchmarks/results/real_token_classification.json
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch


def document(words: int) -> str:
    from pydoc_data.topics import topics

    return " ".join(" ".join(topics[key] for key in sorted(topics)).split()[:words])


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="a FAM checkpoint folder")
    parser.add_argument("--words", type=int, default=1200, help="words of the document (default 1200)")
    parser.add_argument("--chunk", type=int, default=200, help="tokens per streamed chunk (default 200)")
    parser.add_argument("--labels", type=int, default=5)
    parser.add_argument("--fam-update", default="paper", choices=["paper", "sink"],
                        help="the memory update to run (default: the paper's, which carries the memory from block to "
                             "block; a converted checkpoint starts in 'sink', which does not update it)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    from transformers import AutoModelForTokenClassification, AutoTokenizer, pipeline

    import hf_fam  # noqa: F401  (registers the FAM classes)
    from hf_fam import FAMCache

    tokenizer = AutoTokenizer.from_pretrained(args.model)
    torch.manual_seed(0)  # the new score layer
    model = AutoModelForTokenClassification.from_pretrained(args.model, num_labels=args.labels,
                                                            dtype=torch.float32).eval()
    model.config.fam_update = args.fam_update
    text = document(args.words)
    ids = tokenizer(text, return_tensors="pt").input_ids
    with torch.no_grad():
        start = time.perf_counter()
        whole = model(ids).logits
        whole_s = time.perf_counter() - start
        cache, pieces, sizes = FAMCache(model.fam_settings), [], []
        start = time.perf_counter()
        for chunk in ids.split(args.chunk, dim=1):
            pieces.append(model(chunk, cache=cache, use_cache=True).logits)
            sizes.append(cache.nbytes())
        streamed_s = time.perf_counter() - start
    streamed_diff = (torch.cat(pieces, dim=1) - whole).abs().max().item()

    tagger = pipeline("token-classification", model=model, tokenizer=tokenizer)
    texts = [text[: len(text) // 2], text[:300]]
    batched = tagger(texts, batch_size=2, ignore_labels=[])
    alone = [tagger(t, ignore_labels=[]) for t in texts]
    same_labels = all(a["entity"] == b["entity"] for x, y in zip(batched, alone) for a, b in zip(x, y))
    score_diff = max(abs(float(a["score"]) - float(b["score"])) for x, y in zip(batched, alone) for a, b in zip(x, y))

    result = {
        "model": args.model,
        "settings": model.fam_settings.as_kwargs(),
        "tokens": ids.shape[1],
        "window": model.config.attention_window,
        "streamed_vs_whole_max_abs": streamed_diff,
        "chunk_tokens": args.chunk,
        "cache_bytes": sorted(set(sizes)),
        "whole_s": round(whole_s, 2),
        "streamed_s": round(streamed_s, 2),
        "pipeline_rows_tokens": [len(x) for x in batched],
        "pipeline_batched_vs_alone_same_labels": same_labels,
        "pipeline_batched_vs_alone_max_score_diff": score_diff,
        "torch": torch.__version__,
        "machine": f"{platform.machine()}, {args.threads} CPU threads",
    }
    print(json.dumps(result, indent=2))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()
