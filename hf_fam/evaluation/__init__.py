"""Evaluation: passkey retrieval (overall and beyond reach) and perplexity over long text (evaluate), the
StreamingLLM attention-sink baseline FAM is compared against zero-shot (sink_baseline), and the passkey
evaluation's options (options, declared once for the API and `hf-fam eval`).

The names below load on first use (PEP 562): importing `hf_fam.evaluation.options` for `hf-fam eval --help`
must not pull in torch.
"""

from __future__ import annotations

from .._lazy import lazy_exports

# name -> the module that defines it
_EXPORTS = {
    "PasskeyEvalConfig": ".options",
    "card_results": ".evaluate",
    "compare_perplexity": ".evaluate",
    "evaluate_passkey": ".evaluate",
    "evaluate_perplexity": ".evaluate",
    "plot_passkey": ".evaluate",
    "plot_perplexity": ".evaluate",
    "pydoc_text": ".texts",
    "reach_of": ".evaluate",
    "write_json": ".evaluate",
}

__all__ = sorted(_EXPORTS)


__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
