"""What a fine-tuning run writes, and the checks around it: the output folder (`check_output_dir`), a digest of
the trained weights to compare processes (`weights_digest`), and the save at the end (`save_run`): a LoRA run's
adapter (converted back to the unchanged base after a PiSSA start), tokenizer, summary and optional merged model,
or a `--full` run's whole FAM checkpoint. Split from `finetune.py` (the loop)."""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
from dataclasses import replace
from pathlib import Path

from ..checkpoint_io.adapter_card import write_adapter_card
from .lora import save_adapter

logger = logging.getLogger("hf_fam.training")


def check_output_dir(out: Path, overwrite: bool) -> None:
    """Refuse, in one line, an output folder that would mix runs (non-empty, without `overwrite`) or cannot be one."""
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"{out} exists and is not a folder; choose another --output")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise FileExistsError(f"{out} already exists and is not empty (a previous run?); pass --force to replace it "
                              "once this run is done, or choose another --output")
    cwd = Path.cwd().resolve()
    if out.resolve() == cwd or out.resolve() in cwd.parents:
        raise FileExistsError(f"{out} holds the current folder and cannot be replaced; choose another --output")


def weights_digest(model) -> str:
    """SHA-256 of what training changes, to compare processes: a PeftModel's adapter (LoRA and modules_to_save),
    or every weight of a model trained in full."""
    if callable(getattr(model, "get_base_model", None)):
        from peft import get_peft_model_state_dict

        # save_embedding_layers=False: "auto" would look for the base's config.json (a Hub request when it is absent)
        state = get_peft_model_state_dict(model, save_embedding_layers=False)
    else:
        state = dict(model.named_parameters())
    h = hashlib.sha256()
    for name in sorted(state):
        h.update(name.encode())
        h.update(state[name].detach().float().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


# the name the tests and earlier releases use: a PeftModel's digest is its adapter's
adapter_digest = weights_digest


def write_fine_tuned_card(folder: Path, source, name: str | None = None) -> None:
    """The model card of a fine-tuned FAM checkpoint (a `--full` run, or `merged/`), what `hf-fam push` uploads
    with it: marked fine-tuned, with the metadata (base model, license, how fam_init started) of the card hf_fam
    wrote for `source`, the checkpoint the run started from, when it is a folder with one; never its evaluation
    results, which were measured before the training. `name`: the id the card shows (default: the folder's
    name; a run's staging folder passes the output's)."""

    from ..checkpoint_io.cards import write_model_card

    write_model_card(folder, replace(_start_card(source), fine_tuned=True, eval_results=[], repo_id=name))


def _start_card(source):
    """What the card hf_fam wrote for `source` (the checkpoint a run started from) records, when it is a folder
    with one."""
    from ..checkpoint_io.cards import CardInfo, fam_card_info

    source = Path(str(source)) if source is not None else None
    return (fam_card_info(source) if source is not None and source.is_dir() else None) or CardInfo()


def save_run(trained, tokenizer, work: Path, *, out: Path, full: bool, base_path, fam_base_dir: Path | None,
             lora_start: Path | None, merged_dir: Path | None, summary: dict, card_source=None,
             merge_base=None) -> object:
    """Write the run's outputs into `work` (the staging folder that becomes the output): the whole model after a
    full run, else the adapter pointing to `base_path` (for a base converted on the fly, `fam_base_dir`, still in
    `work/fam_base` while saving), and `merged/` when `merged_dir` is set; the tokenizer and `train_summary.json`;
    a model card (`write_fine_tuned_card` for a whole checkpoint, `write_adapter_card` for an adapter) with the
    metadata of `card_source`'s, the checkpoint trained. `merge_base`, for a run on quantized weights: loads the
    unquantized base the saved adapter is merged into for `merged/`.
    Returns the model the run hands back (the merged one when merging spent the PeftModel)."""
    if full:
        trained.save_pretrained(work)
        write_fine_tuned_card(work, card_source, name=out.name)
    else:
        adapter_config = trained.peft_config["default"]
        if fam_base_dir is not None:  # PEFT reads the base's config while saving: here it is still in `work`
            adapter_config.base_model_name_or_path = str((work / "fam_base").resolve())
        save_adapter(trained, work, lora_start)  # an adapter for the unchanged base weights, whatever the start
        if lora_start is not None:
            shutil.rmtree(lora_start)
        if fam_base_dir is not None:  # adapter_config.json names fam_base where it will be
            adapter_config.base_model_name_or_path = str(base_path)
            # the file, not the live config, which after a converted start no longer describes the saved adapter
            config_file = work / "adapter_config.json"
            saved = json.loads(config_file.read_text())
            saved["base_model_name_or_path"] = str(base_path)
            config_file.write_text(json.dumps(saved, indent=2, sort_keys=True))
    if tokenizer is not None:
        tokenizer.save_pretrained(work)
    (work / "train_summary.json").write_text(json.dumps(summary, indent=2))
    if not full:  # in place of PEFT's template: what the adapter is for, what `hf-fam push` renders again
        # the start's license and tags; not its evaluation results, which are the start's, not this adapter's
        write_adapter_card(work, base_model=str(base_path), base_config=trained.get_base_model().config.to_dict(),
                           info=replace(_start_card(card_source), eval_results=[]), name=out.name)
    logger.info("saved the %s to %s%s", "model" if full else "adapter", out,
                "" if full else f" (base: {base_path})")
    if merged_dir is None:
        return trained
    if merge_base is not None:  # the saved adapter on the unquantized base, not the quantized one trained
        from peft import PeftModel

        merged = PeftModel.from_pretrained(merge_base(), work).merge_and_unload()
    else:
        merged = trained.merge_and_unload()  # the PeftModel is spent after this
    merged.save_pretrained(work / "merged")
    if tokenizer is not None:
        tokenizer.save_pretrained(work / "merged")
    write_fine_tuned_card(work / "merged", card_source)
    logger.info("saved the merged model to %s", merged_dir)
    return merged


__all__ = ["adapter_digest", "check_output_dir", "save_run", "weights_digest", "write_fine_tuned_card"]
