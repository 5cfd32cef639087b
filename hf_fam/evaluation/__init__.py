"""Evaluation: passkey retrieval (overall and beyond reach) and perplexity over long text (evaluate), and the
StreamingLLM attention-sink baseline FAM is compared against zero-shot (sink_baseline)."""

from __future__ import annotations

from .evaluate import (
    PasskeyEvalConfig,
    card_results,
    compare_perplexity,
    evaluate_passkey,
    evaluate_perplexity,
    plot_passkey,
    plot_perplexity,
    reach_of,
    write_json,
)

__all__ = [
    "PasskeyEvalConfig",
    "card_results",
    "compare_perplexity",
    "evaluate_passkey",
    "evaluate_perplexity",
    "plot_passkey",
    "plot_perplexity",
    "reach_of",
    "write_json",
]
