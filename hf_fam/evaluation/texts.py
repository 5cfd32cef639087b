"""Long real text that every machine has offline: Python's own documentation (`pydoc_data.topics`).

The benchmarks read it for perplexity at long lengths (zero-shot start, after fine-tuning, block by block),
and none of the training data is drawn from it (`hf-fam finetune --data mix` reads standard-library sources).
"""

from __future__ import annotations


def pydoc_text() -> str:
    """Every topic of Python's documentation, sorted by name, separated by blank lines (about 465k characters)."""
    import pydoc_data.topics as topics

    return "\n\n".join(topics.topics[k] for k in sorted(topics.topics))
