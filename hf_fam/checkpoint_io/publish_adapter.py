"""What `push_to_hub` does with a PEFT LoRA adapter of a FAM checkpoint (a folder holding adapter_config.json, from
`hf-fam finetune` or `peft_model.save_pretrained`): check it and its base, and make the files of its commit.

An adapter is of use to others only on its base, and only a FAM base makes it a FAM model: on the plain model
it was converted from, the same adapter loads without a word and runs full attention. So the base must be on
the Hub as a FAM checkpoint before the adapter goes up: `base_model` names its repo (needed when the adapter names
a local folder, as after `hf-fam finetune`, whose base is `OUT/fam_base` or the folder trained from), the Hub's
config.json of that repo must be a FAM config and, when the local base is still there, the same config as the one
the adapter was trained on. The adapter's `adapter_config.json` goes up naming that repo and the commit of it that
was checked (PEFT's `revision`, which `AutoPeftModelForCausalLM` loads the base at: a base pushed again later with
other weights does not change what the adapter applies to); the folder's own file is not modified. A card saying
what the adapter is for and how to load it goes with it (`adapter_card.py`).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

from .checkpoint import CONFIG_NAME, read_config
from .hub import looks_like_repo_id

logger = logging.getLogger(__name__)

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")
# the first line of PEFT's own card template (peft.utils.other / huggingface_hub's modelcard template)
PEFT_TEMPLATE_MARK = "<!-- Provide a quick summary of what the model is/does. -->"
# config.json keys (at any depth) that may differ between a base and the same base pushed elsewhere: where it was
# saved from, by which release, and the dtype it was saved in (an adapter applies in any)
VOLATILE_CONFIG_KEYS = ("_name_or_path", "transformers_version", "dtype", "torch_dtype")


def is_adapter_folder(folder: Path) -> bool:
    return (folder / ADAPTER_CONFIG).is_file() and not (folder / CONFIG_NAME).is_file()


@dataclass(frozen=True)
class HubBase:
    """The FAM base an adapter goes up with."""

    repo_id: str
    revision: str  # the commit (40 hex digits) whose config.json was checked, pinned in the adapter's config
    config: dict  # that commit's config.json
    local: Path | None  # the local base folder the adapter names, when it is still there


def resolve_base(folder: Path, base_model: str | None, *, base_revision: str | None = None, api,
                 token) -> HubBase:
    """The base the adapter in `folder` goes up with, at `base_revision` (a branch, tag or commit of it; default:
    the revision the adapter names for that repo, else its main branch), resolved to a commit. Raises a one-line
    ValueError, before anything is uploaded, when the adapter lacks its weights, the base (or that revision) is
    not on the Hub, is not a FAM checkpoint, or is another than the one the adapter was trained on."""
    adapter = json.loads((folder / ADAPTER_CONFIG).read_text())
    if adapter.get("peft_type") != "LORA":
        raise ValueError(f"{folder} holds a {adapter.get('peft_type')} adapter; hf_fam pushes LoRA adapters")
    if not any((folder / name).is_file() for name in ADAPTER_WEIGHTS):
        raise ValueError(f"{folder} has adapter_config.json but no {ADAPTER_WEIGHTS[0]}: save the adapter again "
                         "(peft_model.save_pretrained)")
    named = str(adapter.get("base_model_name_or_path") or "")
    local = Path(named).expanduser() if named and Path(named).expanduser().is_dir() else None
    if base_model is None:
        if local is not None or not looks_like_repo_id(named):
            raise ValueError(
                f"{folder}'s adapter applies to {named or 'a base it does not name'}, which others cannot load: "
                f"push the base first (hf-fam push {named or 'BASE'} NAMESPACE/NAME) and name that repo with "
                "--base-model (base_model= in Python)"
            )
        base_model = named
    elif not looks_like_repo_id(base_model):
        raise ValueError(f"--base-model {base_model!r} is not a Hub repo id (namespace/name): push the base first "
                         "and name its repo")
    if base_revision is None and base_model == named:
        base_revision = adapter.get("revision")  # trained on that revision of a Hub base
    revision, base_config = _hub_config(base_model, base_revision, folder, local, api=api, token=token)
    if local is not None and (local / CONFIG_NAME).is_file():
        differ = _differences(base_config, read_config(local))
        if differ:
            key, there, here = differ[0]
            raise ValueError(
                f"{base_model} is not the base {folder}'s adapter was trained on: its config.json differs from "
                f"{local}'s ({key}: {there!r} there, {here!r} here); push {local} there first, or name the commit "
                "of it the adapter was trained on with --base-revision"
            )
    return HubBase(base_model, revision, base_config, local)


def adapter_files(folder: Path) -> list[Path]:
    """The folder's top-level files (not its subfolders: `fam_base/` and `merged/` of `hf-fam finetune` are
    checkpoints of their own, pushed on their own)."""
    return sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith("."))


def adapter_config_bytes(folder: Path, base: HubBase) -> bytes:
    """The folder's adapter_config.json as it goes up: naming `base`'s repo and commit, and a causal-LM adapter.

    An adapter made without a task type (`LoraConfig()` with no `task_type`, as many examples write it) records
    the class it was trained on as an `auto_mapping` to import: `hf_fam.modeling.modeling_fam.FAMForCausalLM`, or
    the `transformers_modules` copy of a checkpoint loaded as remote code. Neither can be imported where the
    adapter is loaded (`AutoPeftModelForCausalLM` refuses it even where hf_fam is installed), so it goes up as
    what it is, `task_type` CAUSAL_LM, which loads the base with `AutoModelForCausalLM`; the weights are the same."""
    adapter = json.loads((folder / ADAPTER_CONFIG).read_text())
    adapter["base_model_name_or_path"], adapter["revision"] = base.repo_id, base.revision
    if adapter.get("task_type") is None and adapter.get("auto_mapping"):
        logger.info("%s: task_type CAUSAL_LM in the pushed adapter_config.json, in place of an auto_mapping to %s, "
                    "which loading elsewhere cannot import", folder, adapter["auto_mapping"].get("parent_library"))
        adapter["task_type"], adapter["auto_mapping"] = "CAUSAL_LM", None
    return (json.dumps(adapter, indent=2, sort_keys=True) + "\n").encode("utf-8")


def card_is_replaceable(folder: Path) -> bool:
    """Whether README.md is missing or a card that is not the user's own: one hf_fam wrote, or PEFT's template."""
    from .cards import CARD_MARK

    path = folder / "README.md"
    if not path.is_file():
        return True
    text = path.read_text(encoding="utf-8", errors="replace")
    return CARD_MARK in text or PEFT_TEMPLATE_MARK in text


def _differences(there: dict, here: dict, prefix: str = "") -> list[tuple[str, object, object]]:
    """(dotted key, value there, value here) for each key both configs have, at any depth, that differs."""
    found = []
    for key in sorted((set(there) & set(here)) - set(VOLATILE_CONFIG_KEYS)):
        a, b = there[key], here[key]
        if isinstance(a, dict) and isinstance(b, dict):
            found += _differences(a, b, f"{prefix}{key}.")
        elif a != b:
            found.append((f"{prefix}{key}", a, b))
    return found


def _hub_config(base_model: str, revision: str | None, folder: Path, local: Path | None, *, api,
                token) -> tuple[str, dict]:
    """(the commit `revision` of `base_model` is at, that commit's config.json)."""
    from huggingface_hub.errors import (
        EntryNotFoundError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    push_first = f"push it first (hf-fam push {local or 'BASE'} {base_model})"
    try:
        commit = api.model_info(base_model, revision=revision, token=token).sha
    except RepositoryNotFoundError:
        raise ValueError(f"the base {base_model} of {folder}'s adapter is not on the Hub (or not visible with this "
                         f"token): {push_first}") from None
    except RevisionNotFoundError:
        raise ValueError(f"the base {base_model} of {folder}'s adapter has no revision {revision!r} on the Hub: name "
                         "a branch, tag or commit of it with --base-revision") from None
    try:
        path = api.hf_hub_download(repo_id=base_model, filename=CONFIG_NAME, revision=commit, token=token)
    except LocalEntryNotFoundError as err:  # no network, or offline mode: says nothing about the repo
        raise ConnectionError(f"cannot reach the Hub to read the base {base_model}'s config.json ({err}); check "
                              "the network, or set HF_ENDPOINT") from None
    except RepositoryNotFoundError:
        raise ValueError(f"the base {base_model} of {folder}'s adapter is not on the Hub (or not visible with this "
                         f"token): {push_first}") from None
    except (EntryNotFoundError, RevisionNotFoundError):
        raise ValueError(f"the base {base_model} of {folder}'s adapter has no config.json on the Hub: "
                         f"{push_first}") from None
    config = json.loads(Path(path).read_text())
    if config.get("model_type") != "fam":
        raise ValueError(
            f"{base_model} is not a FAM checkpoint (model_type {config.get('model_type')!r}): the adapter would load "
            f"on it without FAM and run full attention; push the FAM checkpoint it was trained on and name that repo"
        )
    return commit, config


__all__ = ["HubBase", "adapter_config_bytes", "adapter_files", "card_is_replaceable", "is_adapter_folder",
           "resolve_base"]
