"""The model card of a LoRA adapter for a FAM checkpoint: `ADAPTER/README.md`, from
`model_cards/fam_adapter_card.md`.

PEFT writes a generic card (its template, with `[More Information Needed]` fields) naming the base by the path it was
trained from. This one says what the adapter is for (the FAM settings of its base, read from the base's config.json),
what was trained (LoRA rank, targets, the modules trained in full, the run's steps and data when `hf-fam finetune`
recorded them) and how to load it (`AutoPeftModelForCausalLM` with `trust_remote_code=True`, which fetches the
base). `hf-fam finetune` writes it beside the adapter; `hf-fam push` renders it again for the repo it goes to and
the base's repo id.

Example:
```python
>>> text = render_adapter_card("run", repo_id="me/llama-fam-lora", base_model="me/llama-fam",
...                            base_config=json.load(open("llama-fam/config.json")))
```
"""

from __future__ import annotations

import json
from pathlib import Path
from string import Template

from ..modeling.configuration_fam import HEADS
from .cards import BASE_TAGS, HEAD_CARDS, CardInfo, card_metadata, evaluation_table, fam_card_info, template_text
from .inspection import fam_summary

ADAPTER_TEMPLATE_NAME = "fam_adapter_card.md"
ADAPTER_TAGS = ("lora", "peft")
# what `hf-fam finetune` writes beside an adapter (training/outputs.py, training/options.py)
RUN_SUMMARY, RUN_CONFIG = "train_summary.json", "finetune_config.json"
# an adapter's PEFT task type -> the transformers Auto class its base loads with (any other: a causal LM)
ADAPTER_AUTO_CLASSES = {task_type: auto_class for auto_class, (_, _, task_type) in HEADS.items()}


def render_adapter_card(folder: str | Path, *, repo_id: str | None, base_model: str, base_config: dict,
                        info: CardInfo | None = None, base_revision: str | None = None) -> str:
    """The card of the adapter in `folder` (its adapter_config.json, and the run records when present).

    Args:
        folder: the adapter folder.
        repo_id: the id shown in the usage snippet (None: the folder's name).
        base_model: the base's Hub id, or its local path before the base is pushed.
        base_config: the base's config.json (a FAM config).
        info: license, language and tags to carry (those of the base's card, or of an earlier card).
        base_revision: the base's commit the pushed adapter_config.json pins (None: not pinned).

    Returns:
        The README.md text: YAML metadata, then markdown.
    """
    import hf_fam

    from .hub import looks_like_repo_id

    folder = Path(folder)
    adapter = json.loads((folder / "adapter_config.json").read_text())
    summary = fam_summary(base_config)
    info = info or CardInfo()
    model_id = repo_id or folder.resolve().name
    on_hub = looks_like_repo_id(base_model) and not Path(base_model).exists()
    tags = [*BASE_TAGS, summary.model_type, *ADAPTER_TAGS]
    if on_hub:
        tags.append(f"base_model:adapter:{base_model}")
    tags = list(dict.fromkeys(tags + [t for t in info.tags if not t.startswith("base_model:")]))
    title = model_id.split("/")[-1]
    auto_class = ADAPTER_AUTO_CLASSES.get(adapter.get("task_type"), "AutoModelForCausalLM")
    pipeline_tag, use_model = HEAD_CARDS[auto_class]
    labels = _score_labels(folder) if auto_class != "AutoModelForCausalLM" else None
    data = card_metadata(info, pipeline_tag=pipeline_tag, base_model=base_model if on_hub else None,
                         library_name="peft", tags=tags,
                         model_name=title if info.eval_results else None, eval_results=info.eval_results or None)
    rank, alpha = adapter.get("r"), adapter.get("lora_alpha")
    values = dict(
        metadata=data.to_yaml(),
        title=title,
        base_model_text=f"[{base_model}](https://huggingface.co/{base_model})" if on_hub else f"`{base_model}`",
        base_model=base_model,
        base_pin=_pin_text(base_model, base_revision) if on_hub and base_revision else "",
        transformers_pin=" (at the base's newest commit: transformers does not read the pin)"
        if on_hub and base_revision else "",
        architecture=summary.architecture,
        peft_class="AutoPeft" + auto_class.removeprefix("Auto"),  # AutoPeftModelForCausalLM, ...
        auto_class=auto_class,
        pipeline_tag=pipeline_tag,
        use_model=use_model,
        label_kwargs=f", num_labels={labels}" if labels else "",
        pipeline_kwargs=f', model_kwargs={{"num_labels": {labels}}}' if labels else "",
        block_size=f"{summary.block_size:,}",
        attention_window=f"{summary.attention_window:,}",
        fam_length=summary.fam_length,
        rank=rank,
        alpha=alpha,
        target_modules=module_names(adapter.get("target_modules")),
        modules_to_save=module_names(adapter.get("modules_to_save")),
        training=_training_text(folder),
        evaluation=evaluation_table(info.eval_results, "adapter"),
        model_id=model_id,
        tokenizer_id=model_id if (folder / "tokenizer_config.json").is_file() else base_model,
        hf_fam_version=hf_fam.__version__,
    )
    return Template(template_text(ADAPTER_TEMPLATE_NAME)).substitute(values)


def _score_labels(folder: Path) -> int | None:
    """The number of labels of the classifier an adapter was trained on: the rows of the `score` layer it saved
    (PEFT's SEQ_CLS and TOKEN_CLS adapters save it in full), which its base may not have (a causal LM checkpoint has
    two labels by default, a reward model one), so loading must be told. None when the adapter holds no score."""
    from safetensors import safe_open

    path = folder / "adapter_model.safetensors"
    if not path.is_file():
        return None
    with safe_open(str(path), "pt") as weights:
        rows = [weights.get_slice(key).get_shape()[0] for key in weights.keys() if key.endswith("score.weight")]
    return rows[0] if rows else None


def _pin_text(base_model: str, revision: str) -> str:
    return (f" at the commit the adapter was pushed against, [`{revision[:7]}`](https://huggingface.co/{base_model}/"
            f"tree/{revision}) (adapter_config.json's `revision`: pushing the base again does not change it)")


def write_adapter_card(folder: str | Path, *, base_model: str, base_config: dict, info: CardInfo | None = None,
                       name: str | None = None):
    """Render the card for the adapter where it is into `folder/README.md`; `name` is the id it shows (default:
    the folder's name)."""
    path = Path(folder) / "README.md"
    path.write_text(render_adapter_card(folder, repo_id=name, base_model=base_model, base_config=base_config,
                                        info=info), encoding="utf-8")
    return path


def adapter_card_info(folder: str | Path, base_folder: str | Path | None = None) -> CardInfo:
    """What the adapter's card carries into the next rendering: the card hf_fam wrote in `folder` (its license,
    tags and evaluation results), with the license and languages of its base's card (`base_folder`, a local FAM
    checkpoint) where the adapter's says none."""
    from dataclasses import replace

    own = fam_card_info(folder) or CardInfo()
    base = (fam_card_info(base_folder) if base_folder is not None and Path(base_folder).is_dir() else None)
    if base is None:
        return own
    return replace(own, license=own.license or base.license, license_name=own.license_name or base.license_name,
                   license_link=own.license_link or base.license_link, language=own.language or base.language,
                   tags=own.tags or base.tags)


def module_names(modules, quote: str = "`") -> str:
    """An adapter config's `target_modules` / `modules_to_save` as text: a list of names (sorted, each in `quote`),
    or the regular expression PEFT also takes there."""
    if not modules:
        return "none"
    if isinstance(modules, str):  # a regular expression
        return f"modules matching {quote}{modules}{quote}"
    return ", ".join(f"{quote}{m}{quote}" for m in sorted(modules))


def _training_text(folder: Path) -> str:
    """One line from the run records `hf-fam finetune` writes, when they are there."""
    def read(name):
        try:
            return json.loads((folder / name).read_text())
        except (OSError, ValueError):
            return {}

    summary, config = read(RUN_SUMMARY), read(RUN_CONFIG)
    if not summary.get("steps"):
        return "not recorded with the adapter"
    data = config.get("data") or {}
    parts = [f"`hf-fam finetune`, {summary['steps']} steps"
             + (" more, from an earlier adapter's weights" if summary.get("continued_from") else "")]
    if summary.get("quantized"):  # QLoRA: the base's weights were quantized while training, not in the adapter
        parts[0] += f" on the base loaded in {summary['quantized']} (QLoRA)"
    if data.get("source"):
        parts.append(f"{data['source']} data in sequences of {data.get('seq_len', '?')} tokens")
    if isinstance(summary.get("final_loss"), (int, float)):
        parts.append(f"final loss {summary['final_loss']:.4g}")
        fresh, passed = summary.get("final_loss_fresh_memory"), summary.get("final_loss_passed_memory")
        if isinstance(passed, (int, float)):  # Random State Passing: the whole loss mixes two kinds of forward
            parts[-1] += (f" (from a fresh memory {fresh:.4g}, " if isinstance(fresh, (int, float)) else " (") + \
                f"from a memory passed on {passed:.4g})"
    heldout = summary.get("heldout_loss") or {}
    if all(isinstance(heldout.get(k), (int, float)) for k in ("start", "final")):
        parts.append(f"loss on {summary.get('heldout_sequences', '?')} held-out sequences {heldout['start']:.4g} at "
                     f"the start, {heldout['final']:.4g} at the end"
                     + (f" ({heldout['given']:.4g} for the checkpoint as converted)"
                        if isinstance(heldout.get("given"), (int, float)) else ""))
    return ", ".join(parts)


__all__ = ["adapter_card_info", "module_names", "render_adapter_card", "write_adapter_card"]
