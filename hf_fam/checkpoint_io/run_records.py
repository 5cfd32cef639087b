"""`hf-fam finetune`'s run records as they go up with `hf-fam push`: `public_run_records`.

A run folder holds `train_summary.json` and `finetune_config.json`, which name where the run read and wrote on
the machine it ran on: the model it started from, the text files, the output folder, the base of its adapter, a
merged model. Pushed as they are, they would publish those paths (a home folder's name, say) and mean nothing
where the repo is loaded. So what goes up names each local path by its last part, the base by its Hub repo, and
leaves out the local merged model; Hub ids stay as they are. The folder's own files are not modified.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from .adapter_card import RUN_CONFIG, RUN_SUMMARY

# the fields of each record that hold a path (dotted for a nested field): every other value is kept as it is
PATH_FIELDS = {
    RUN_SUMMARY: ("base_model", "continued_from"),
    RUN_CONFIG: ("model.path", "data.text_files", "train.output_dir"),
}
LOCAL_ONLY_FIELDS = {RUN_SUMMARY: ("merged",)}  # a folder that does not go up with the repo


def public_run_records(folder: Path, base_model: str | None = None) -> dict[str, bytes]:
    """The run records in `folder` as they go up: {file name: its bytes}, for each record that is a JSON object
    (any other file goes up as it is). `base_model`: the Hub repo of the adapter's base, named in place of the
    local folder the run trained on."""
    public = {}
    for name, fields in PATH_FIELDS.items():
        try:
            record = json.loads((folder / name).read_text())
        except (OSError, ValueError):
            continue
        if not isinstance(record, dict):
            continue
        for field in fields:
            _rewrite(record, field.split("."), _last_part)
        for field in LOCAL_ONLY_FIELDS.get(name, ()):
            record.pop(field, None)
        if name == RUN_SUMMARY and base_model is not None:
            record["base_model"] = base_model
        public[name] = (json.dumps(record, indent=2) + "\n").encode("utf-8")
    return public


def _rewrite(record: dict, keys: list[str], change) -> None:
    if not isinstance(record, dict) or keys[0] not in record:
        return
    if len(keys) > 1:
        _rewrite(record[keys[0]], keys[1:], change)
    else:
        value = record[keys[0]]
        record[keys[0]] = [change(v) for v in value] if isinstance(value, list) else change(value)


def _last_part(value):
    """A local path's last part (a folder's or a file's name); a Hub id, or anything not a path here, as it is."""
    if not isinstance(value, str) or not value:
        return value
    path = Path(os.path.expanduser(value))
    if path.is_absolute() or path.exists():
        return path.resolve().name or value
    return value


__all__ = ["PATH_FIELDS", "public_run_records"]
