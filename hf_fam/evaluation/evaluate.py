"""Evaluation: passkey retrieval (overall and beyond reach) and perplexity over long text by streaming.

Works for FAM models and for plain base models alike. Results are JSON-ready dicts whose `"results"` list
is what the model card's results section reads (`hf_fam.checkpoint_io.cards.load_eval_results`).

"Beyond reach": with L layers and M memory segments, block sliding window attention carries information at
most L·M blocks back (plus the current block). A key further back than that can only be retrieved
through memory; BSWA scores 0 % there by construction.

Example:
```python
>>> results = evaluate_passkey(model, PasskeyEvalConfig(lengths=[256, 1024], trials=200, form="synthetic"))
>>> results["rows"][0]["accuracy"], results["rows"][0]["beyond_reach_accuracy"]
(0.99, 0.97)
```
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict
from pathlib import Path

import torch

from ..tasks.passkey import PasskeyConfig, beyond_reach, passkey_exact_match, passkey_examples
from .options import PasskeyEvalConfig


def reach_of(model) -> dict | None:
    """C, M, L and the attention window of a FAM model (None for a model without FAM)."""
    config = getattr(model, "config", None)
    settings = getattr(model, "fam_settings", None)
    if settings is None:
        return None
    base = getattr(config, "base_config", config)
    return {
        "block_size": settings.block_size,
        "memory_segments": settings.memory_segments,
        "fam_length": settings.fam_length,
        "num_layers": base.num_hidden_layers,
        "window": settings.block_size * (settings.memory_segments + 1),
    }


@torch.no_grad()
def _answer_logits(model, ids: torch.Tensor, mask: torch.Tensor, tail: int, chunk_tokens: int) -> torch.Tensor:
    """Logits of the last `tail` positions, reading long inputs chunk by chunk through the cache."""
    n = ids.shape[1]
    if n <= chunk_tokens:
        return model(ids, attention_mask=mask, use_cache=False).logits[:, -tail:]
    cache = None
    start = 0
    while n - start > chunk_tokens:
        out = model(ids[:, start : start + chunk_tokens], attention_mask=mask[:, : start + chunk_tokens],
                    cache=cache, use_cache=True, logits_to_keep=1)
        cache, start = out.cache, start + chunk_tokens
    out = model(ids[:, start:], attention_mask=mask, cache=cache, use_cache=True)
    return out.logits[:, -tail:]


def evaluate_passkey(model, config: PasskeyEvalConfig, tokenizer=None, *, reach: dict | None = None,
                     progress: bool = False, label: str | None = None) -> dict:
    """Passkey retrieval accuracy per length, overall and beyond reach.

    Args:
        model: a FAM model or a plain causal LM (eval mode is set).
        config: lengths, trials, form, ...
        tokenizer: needed for the text form.
        reach: C, M, L used to classify "beyond reach"; default: the model's own (FAM models). For a plain
            model pass the settings of the FAM model it is compared with.
        progress: a tqdm bar over lengths.
        label: a name for the results (e.g. "FAM", "BSWA").

    Returns:
        {"label", "reach", "config", "rows": [per length: trials, accuracy, in_reach_*, beyond_reach_*],
         "results": [entries for the model card]}
    """
    model.eval()
    device = next(model.parameters()).device
    reach = reach or reach_of(model)
    pad = 0
    if tokenizer is not None and tokenizer.pad_token_id is not None:
        pad = tokenizer.pad_token_id
    rows = []
    lengths = config.lengths
    if progress:
        from tqdm.auto import tqdm

        lengths = tqdm(lengths, desc="passkey", unit="length")
    for length in lengths:
        data_config = PasskeyConfig(
            num_examples=config.trials, seq_len=length, depth=config.depth, key_digits=config.key_digits,
            form=config.form, vocab_offset=config.vocab_offset, seed=config.seed * 1_000_003 + length,
        )
        examples = list(passkey_examples(data_config, tokenizer))
        correct, far = [], []
        for b in range(0, len(examples), config.batch_size):
            batch = examples[b : b + config.batch_size]
            width = max(len(e["input_ids"]) for e in batch)
            ids = torch.full((len(batch), width), pad, dtype=torch.long)
            labels = torch.full((len(batch), width), -100, dtype=torch.long)
            mask = torch.zeros(len(batch), width, dtype=torch.long)
            for i, e in enumerate(batch):  # left padding: every answer ends at the last column
                n = len(e["input_ids"])
                ids[i, width - n :] = torch.tensor(e["input_ids"])
                labels[i, width - n :] = torch.tensor(e["labels"])
                mask[i, width - n :] = 1
            tail = max(len(e["input_ids"]) - e["prompt_length"] for e in batch) + 1
            logits = _answer_logits(model, ids.to(device), mask.to(device), tail, config.chunk_tokens)
            correct += passkey_exact_match(logits.float().cpu(), labels[:, -tail:]).tolist()
            if reach is not None:
                far += [beyond_reach(e["key_end"], e["prompt_length"], block_size=reach["block_size"],
                                     memory_segments=reach["memory_segments"], num_layers=reach["num_layers"])
                        for e in batch]
        rows.append(_row(length, correct, far, reach))
    result = {"label": label, "reach": reach, "config": asdict(config), "rows": rows}
    result["results"] = card_results(result)
    return result


def _row(length: int, correct: list[bool], far: list[bool], reach: dict | None) -> dict:
    n = len(correct)
    row = {"length": length, "trials": n, "accuracy": sum(correct) / n}
    if reach is not None:
        row["window_multiple"] = length / reach["window"]
        beyond = [c for c, f in zip(correct, far) if f]
        within = [c for c, f in zip(correct, far) if not f]
        row["beyond_reach_trials"] = len(beyond)
        row["beyond_reach_accuracy"] = sum(beyond) / len(beyond) if beyond else None
        row["in_reach_trials"] = len(within)
        row["in_reach_accuracy"] = sum(within) / len(within) if within else None
    return row


def card_results(result: dict) -> list[dict]:
    """Model-card entries ({task, metric, value, dataset, setting}) for a passkey result."""
    out = []
    form = result["config"]["form"]
    for row in result["rows"]:
        where = f"{row['length']} tokens"
        if "window_multiple" in row:
            where += f" ({row['window_multiple']:g}x window)"
        out.append({"task": "passkey retrieval", "metric": "accuracy", "value": round(row["accuracy"], 4),
                    "dataset": f"{form} passkey", "setting": f"{where}, {row['trials']} trials"})
        if row.get("beyond_reach_accuracy") is not None:
            out.append({"task": "passkey retrieval", "metric": "accuracy",
                        "value": round(row["beyond_reach_accuracy"], 4),
                        "dataset": f"{form} passkey",
                        "setting": f"{where}, beyond reach, {row['beyond_reach_trials']} trials"})
    return out


@torch.no_grad()
def evaluate_perplexity(model, token_chunks, *, max_tokens: int | None = None, progress: bool = False) -> dict:
    """Perplexity of a long token stream, read chunk by chunk through the model's cache.

    For a FAM model the cache has a constant size, so the stream may be arbitrarily long; a plain model's
    cache grows with it. Besides the overall figure, the negative log-likelihood is reported per position
    range (0-1k, 1k-2k, 2k-4k, ...): with working memory it keeps falling with context.

    Args:
        model: a FAM model or a plain causal LM.
        token_chunks: iterable of 1D token sequences (e.g. `hf_fam.runtime.streaming.iter_text_file_tokens`).
        max_tokens: stop after this many tokens.

    Returns:
        {"tokens", "nll", "perplexity", "by_position": [{"start", "end", "tokens", "nll", "perplexity"}],
         "results": [model-card entry]}
    """
    model.eval()
    device = next(model.parameters()).device
    cache, prev_logit, seen = None, None, 0
    total_nll, total = 0.0, 0
    bins: dict[int, list[float]] = {}
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=max_tokens, unit="tok", unit_scale=True, desc="perplexity")
    for chunk in token_chunks:
        ids = torch.as_tensor(chunk, dtype=torch.long, device=device).reshape(1, -1)
        if max_tokens is not None:
            ids = ids[:, : max_tokens - seen]
        if ids.shape[1] == 0:
            break
        out = model(ids, cache=cache, use_cache=True)
        cache = out.cache if hasattr(out, "cache") else out.past_key_values
        logits = out.logits.float()
        if prev_logit is not None:
            logits = torch.cat([prev_logit, logits], dim=1)
            targets = ids[0]
            first = seen
        else:
            targets = ids[0, 1:]
            first = seen + 1
        pred = logits[0, : targets.shape[0]]
        nll = torch.nn.functional.cross_entropy(pred, targets, reduction="none")
        positions = torch.arange(first, first + targets.shape[0])
        for b in torch.unique(_bin_of(positions)).tolist():
            sel = _bin_of(positions) == b
            acc = bins.setdefault(b, [0.0, 0])
            acc[0] += nll[sel].sum().item()
            acc[1] += int(sel.sum())
        total_nll += nll.sum().item()
        total += targets.shape[0]
        prev_logit = out.logits[:, -1:].float()
        seen += ids.shape[1]
        if bar is not None:
            bar.update(ids.shape[1])
        if max_tokens is not None and seen >= max_tokens:
            break
    if bar is not None:
        bar.close()
    if total == 0:
        raise ValueError("perplexity needs at least two tokens of text")
    by_position = []
    for b in sorted(bins):
        s, n = bins[b]
        lo, hi = (0, 1024) if b == 0 else (1024 * 2 ** (b - 1), 1024 * 2**b)
        by_position.append({"start": lo, "end": hi, "tokens": n, "nll": s / n, "perplexity": math.exp(s / n)})
    nll = total_nll / total
    return {
        "tokens": total + 1,
        "nll": nll,
        "perplexity": math.exp(nll),
        "by_position": by_position,
        "results": [{"task": "language modeling", "metric": "perplexity", "value": round(math.exp(nll), 4),
                     "setting": f"{total + 1} tokens, streamed"}],
    }


def _bin_of(positions: torch.Tensor) -> torch.Tensor:
    """0 for positions < 1024, then k for [1024·2^(k-1), 1024·2^k)."""
    return torch.where(positions < 1024, 0, torch.floor(torch.log2(positions.clamp(min=1024) / 1024)).long() + 1)


def compare_perplexity(model, make_chunks, *, variants=("base", "bswa", "fam"), max_tokens: int | None = None,
                       progress: bool = False) -> dict:
    """Perplexity of the same text under the FAM model and, with the same weights, BSWA and the base model.

    "fam" is the model as it is; "bswa" the same C and M without memory (F = 0); "base" full attention
    (F = 0, M = 0 and one block as long as the text: the unmodified model, docs/design.md §1). The settings are
    changed on the model's config for each run and restored afterwards.

    Args:
        model: a FAM model (FAMForCausalLM).
        make_chunks: a callable returning a fresh iterable of token chunks (the text is read once per variant).

    Returns:
        {variant: evaluate_perplexity's result}
    """
    config = model.config
    saved = (config.block_size, config.memory_segments, config.fam_length)
    out = {}
    try:
        for variant in variants:
            chunks = None
            if variant == "bswa":
                config.fam_length = 0
            elif variant == "base":
                # one block as long as what is read, counted first: a longer block would only cost memory (the
                # plan's positions span it; 2**31 tokens were 17 GB). The chunks are kept for the read: full
                # attention holds what it reads anyway, and the text is tokenized once, up to max_tokens.
                chunks, length = [], 0
                for chunk in make_chunks():
                    if max_tokens and length >= max_tokens:
                        break
                    chunks.append(chunk)
                    length += len(chunk)
                longest = max(1, min(length, max_tokens) if max_tokens else length)
                config.block_size, config.memory_segments, config.fam_length = longest, 0, 0
            elif variant != "fam":
                raise ValueError(f"unknown variant {variant!r}; expected base, bswa or fam")
            out[variant] = evaluate_perplexity(model, make_chunks() if chunks is None else chunks,
                                               max_tokens=max_tokens, progress=progress)
            config.block_size, config.memory_segments, config.fam_length = saved
    finally:
        config.block_size, config.memory_segments, config.fam_length = saved
    return out


def plot_perplexity(results: dict[str, dict], path: str | Path, title: str = "Perplexity by position") -> Path:
    """Perplexity in each position range (evaluate_perplexity's `by_position`) for several models."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.0), dpi=120)
    for i, (name, res) in enumerate(results.items()):
        rows = res["by_position"]
        xs = [(r["start"] + min(r["end"], r["start"] + r["tokens"])) / 2 for r in rows]
        ax.plot(xs, [r["perplexity"] for r in rows], "o-", color=f"C{i}", label=name)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("token position (middle of each range)")
    ax.set_ylabel("perplexity")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    ax.set_title(title)
    return _save_figure(fig, path)


def plot_passkey(results: list[dict], path: str | Path, title: str = "Passkey retrieval") -> Path:
    """Accuracy vs length (in attention windows when known): overall solid, beyond reach dashed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.0), dpi=120)
    for i, res in enumerate(results):
        color = f"C{i}"
        rows = res["rows"]
        use_window = all("window_multiple" in r for r in rows)
        xs = [r["window_multiple"] if use_window else r["length"] for r in rows]
        name = res.get("label") or f"model {i + 1}"
        ax.plot(xs, [100 * r["accuracy"] for r in rows], "o-", color=color, label=f"{name}: all keys")
        far = [(x, r["beyond_reach_accuracy"]) for x, r in zip(xs, rows) if r.get("beyond_reach_accuracy") is not None]
        if far:
            ax.plot([x for x, _ in far], [100 * a for _, a in far], "s--", color=color, label=f"{name}: beyond reach")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("sequence length (attention windows)" if all(
        "window_multiple" in r for res in results for r in res["rows"]) else "sequence length (tokens)")
    ax.set_ylabel("exact match (%)")
    ax.set_ylim(-3, 103)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(title)
    return _save_figure(fig, path)


def _save_figure(fig, path: str | Path) -> Path:
    """Lay out, write (making the folder) and close a figure; returns the path."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


def write_json(result, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(result, indent=2))
    tmp.replace(path)
    return path
