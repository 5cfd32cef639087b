"""Model cards for FAM checkpoints: `OUT/README.md`, generated from `model_cards/fam_model_card.md`.

The template (a `string.Template`, `$name` placeholders) lives in the repository's top-level `model_cards/`
folder and ships inside the package as `hf_fam/model_cards/` (a link to that folder in a source checkout,
package data in a wheel), so an installed hf_fam finds it too.

A card has YAML metadata for the Hub (base_model, library_name, tags, pipeline_tag, the base model's
license, evaluation results as `model-index`, and an `hf_fam` entry recording how `fam_init` started),
a table of the FAM settings with the resulting attention window and cache size (read from config.json),
a usage snippet with `trust_remote_code=True`, the evaluation results when given, and the citation.

`hf-fam card PATH` regenerates a card: the FAM figures come again from config.json, and what only the
previous card knew (base model, license, results, fam_init) is read back from its metadata.

Evaluation results are given as JSON, either a list or an object with a "results" list, each entry:

    {"task": "passkey retrieval", "metric": "accuracy", "value": 0.98,
     "dataset": "synthetic passkey", "setting": "8192 tokens (4x window), beyond reach"}

`task`, `metric` and `value` are required; `dataset` defaults to the task, `setting` is optional.

Example:
```python
>>> write_model_card("llama-fam", CardInfo(base_model="meta-llama/Llama-3.2-1B", license="llama3.2"))
>>> regenerate_model_card("llama-fam", eval_results=load_eval_results("eval.json"))
```
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field, replace
from importlib import resources
from pathlib import Path
from string import Template

from .checkpoint import read_config
from .inspection import fam_summary, format_bytes

TEMPLATE_NAME = "fam_model_card.md"
BASE_TAGS = ("fam", "transformerfam", "long-context", "feedback-attention-memory")


@dataclass
class CardInfo:
    """What a card needs besides config.json.

    Attributes:
        base_model: the base model's Hub id (None when converted from a local folder).
        license, license_name, license_link: the base model's license metadata.
        language: the base model's languages.
        fam_init: how `fam_init` started, one phrase (e.g. "random normal (std 0.02, seed 0)").
        fine_tuned: whether the model has been fine-tuned with FAM since conversion.
        repo_id: the id shown in the usage snippet (default: the folder's name).
        eval_results: `huggingface_hub.EvalResult`s (see `load_eval_results`).
        tags: tags besides hf_fam's own.
    """

    base_model: str | None = None
    license: str | None = None
    license_name: str | None = None
    license_link: str | None = None
    language: str | list[str] | None = None
    fam_init: str | None = None
    fine_tuned: bool = False
    repo_id: str | None = None
    eval_results: list = field(default_factory=list)
    tags: list[str] = field(default_factory=list)


def template_text() -> str:
    """The card template, from the installed package (`hf_fam/model_cards/`)."""
    return resources.files("hf_fam").joinpath("model_cards", TEMPLATE_NAME).read_text(encoding="utf-8")


def render_model_card(folder: str | Path, info: CardInfo) -> str:
    """The card of the FAM checkpoint in `folder` (its config.json gives the settings).

    Args:
        folder: a FAM checkpoint folder (only config.json is read).
        info: base model, license, results, ...

    Returns:
        The README.md text: YAML metadata, then markdown.

    Example:
    ```python
    >>> text = render_model_card("llama-fam", CardInfo(base_model="meta-llama/Llama-3.2-1B"))
    ```
    """
    from huggingface_hub import ModelCardData

    import hf_fam

    folder = Path(folder)
    summary = fam_summary(read_config(folder))
    model_id = info.repo_id or folder.resolve().name
    title = model_id.split("/")[-1]
    tags = list(BASE_TAGS) + [summary.model_type] + [t for t in info.tags if t not in BASE_TAGS]
    tags = list(dict.fromkeys(tags))
    data = ModelCardData(
        base_model=info.base_model,
        library_name="transformers",
        pipeline_tag="text-generation",
        license=info.license,
        license_name=info.license_name,
        license_link=info.license_link,
        language=info.language,
        tags=tags,
        model_name=title if info.eval_results else None,
        eval_results=info.eval_results or None,
        hf_fam={k: v for k, v in (("fam_init", info.fam_init), ("fine_tuned", info.fine_tuned)) if v is not None},
    )
    if info.base_model:
        base_text = f"[{info.base_model}](https://huggingface.co/{info.base_model})"
    else:
        base_text = f"a {summary.architecture} checkpoint"
    values = dict(
        metadata=data.to_yaml(),
        title=title,
        base_model_text=base_text,
        fam_init_text=_fam_init_text(info),
        architecture=summary.architecture,
        num_layers=summary.num_layers,
        hidden_size=summary.hidden_size,
        num_heads=summary.num_heads,
        num_kv_heads=summary.num_kv_heads,
        block_size=f"{summary.block_size:,}",
        memory_segments=summary.memory_segments,
        fam_length=summary.fam_length,
        attention_window=f"{summary.attention_window:,}",
        cache_per_layer=format_bytes(summary.kv_cache_bytes_per_layer),
        dtype=summary.dtype,
        model_id=model_id,
        evaluation=_evaluation_table(info.eval_results),
        hf_fam_version=hf_fam.__version__,
    )
    return Template(template_text()).substitute(values)


def write_model_card(folder: str | Path, info: CardInfo) -> Path:
    """Render the card and write it to `folder/README.md`; returns the path."""
    path = Path(folder) / "README.md"
    path.write_text(render_model_card(folder, info), encoding="utf-8")
    return path


def read_card_info(folder: str | Path) -> CardInfo:
    """What an existing `folder/README.md` records in its metadata (an empty CardInfo if there is none)."""
    from huggingface_hub import ModelCard

    path = Path(folder) / "README.md"
    if not path.is_file():
        return CardInfo()
    data = ModelCard.load(path, ignore_metadata_errors=True).data
    extra = data.to_dict().get("hf_fam") or {}
    return CardInfo(
        base_model=data.base_model if isinstance(data.base_model, str) else None,
        license=data.license,
        license_name=data.license_name,
        license_link=data.license_link,
        language=data.language,
        fam_init=extra.get("fam_init"),
        fine_tuned=bool(extra.get("fine_tuned", False)),
        eval_results=list(data.eval_results or []),
        tags=[t for t in (data.tags or []) if t not in BASE_TAGS],
    )


def regenerate_model_card(folder: str | Path, **overrides) -> Path:
    """Rewrite `folder/README.md` from config.json and the previous card's metadata.

    Args:
        folder: a FAM checkpoint folder.
        overrides: CardInfo fields to set (None values are ignored), e.g. eval_results=[...].

    Returns:
        The card's path.
    """
    info = read_card_info(folder)
    info = replace(info, **{k: v for k, v in overrides.items() if v is not None})
    return write_model_card(folder, info)


def load_eval_results(path: str | Path) -> list:
    """Read evaluation results (the JSON described in the module docstring) as `EvalResult`s.

    Raises:
        FileNotFoundError: no such file.
        ValueError: not JSON, or an entry without task / metric / value (naming the entry).
    """
    from huggingface_hub import EvalResult

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"evaluation results {path}: no such file")
    try:
        raw = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"evaluation results {path.name} is not valid JSON ({err.msg}, line {err.lineno})") from None
    entries = raw.get("results") if isinstance(raw, dict) else raw
    if not isinstance(entries, list):
        raise ValueError(f"evaluation results {path.name}: expected a list of results or {{\"results\": [...]}}")
    results = []
    for i, entry in enumerate(entries):
        missing = [k for k in ("task", "metric", "value") if not isinstance(entry, dict) or entry.get(k) is None]
        if missing:
            raise ValueError(f"evaluation results {path.name}: entry {i} lacks {', '.join(missing)} "
                             "(each needs task, metric and value; dataset and setting are optional)")
        dataset = str(entry.get("dataset") or entry["task"])
        results.append(EvalResult(
            task_type="text-generation",
            task_name=str(entry["task"]),
            dataset_type=_slug(dataset),
            dataset_name=dataset,
            dataset_config=str(entry["setting"]) if entry.get("setting") is not None else None,
            metric_type=_slug(str(entry["metric"])),
            metric_name=str(entry["metric"]),
            metric_value=entry["value"],
        ))
    return results


def _fam_init_text(info: CardInfo) -> str:
    start = f"It started as {info.fam_init}." if info.fam_init else ""
    if info.fine_tuned:
        return f"{start} The model has been fine-tuned with FAM.".strip()
    return (f"{start} **Not fine-tuned with FAM yet**: the base model was trained with full attention, so the "
            "memory carries little before training. Fine-tune it with FAM (the paper uses LoRA on attention and "
            "MLP, with `fam_init` trainable) before relying on what lies beyond the attention window.").strip()


def _evaluation_table(results: list) -> str:
    if not results:
        return "No evaluation results were recorded for this checkpoint."
    rows = ["| task | dataset | setting | metric | value |", "|---|---|---|---|---|"]
    for r in results:
        cells = [r.task_name or r.task_type, r.dataset_name, r.dataset_config or "", r.metric_name or r.metric_type,
                 _value(r.metric_value)]
        rows.append("| " + " | ".join(str(c).replace("|", "\\|") for c in cells) + " |")
    return "\n".join(rows)


def _value(value) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "unknown"
