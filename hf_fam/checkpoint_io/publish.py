"""Share a FAM checkpoint on the Hub: `push_to_hub(folder_or_model, repo_id)` and `hf-fam push`.

What is pushed is what others load with one `from_pretrained(repo_id, trust_remote_code=True)`, so a folder is
checked first (`check_pushable`: config.json, every weight, every code file its own code imports), and a model is
written with `save_pretrained` into a temporary folder. Code that differs from the installed hf_fam's (a checkpoint
converted by another release) is pushed as it is, with a warning. Nothing is uploaded when a check fails, and the
folder itself is never modified.

The model card goes with it, as README.md in the same commit: a card written by hf_fam (`hf-fam convert`,
`hf-fam card`) is rendered again with the repo's id in its usage snippet, keeping its metadata (base model,
license, evaluation results) and, like `hf-fam card`, not edits to its text; a card of the user's own is
uploaded as it is; a folder without one gets a new card. transformers' own `model.push_to_hub(repo_id)` on a
FAM model comes here too, where hf_fam is installed (a model loaded as remote code, without hf_fam, pushes
through transformers, with its generic card).

Only the folder's top-level files are uploaded (hidden files and subfolders are not part of a checkpoint).

A LoRA adapter (a folder with adapter_config.json, or a PeftModel) goes up on its own, once its FAM base is on the
Hub: `base_model` names the base's repo, which must hold a FAM checkpoint, the one the adapter was trained on
(`publish_adapter.py`).

Example:
```python
>>> push_to_hub("llama-fam", "me/llama-fam")             # a folder from `hf-fam convert`
>>> push_to_hub(model, "me/llama-fam", tokenizer=tok)     # a FAMForCausalLM or a patched model
>>> push_to_hub("run/fam_base", "me/llama-fam-base")      # `hf-fam finetune`'s LoRA output: the base, then
>>> push_to_hub("run", "me/llama-fam-lora", base_model="me/llama-fam-base")  # the adapter
```
"""

from __future__ import annotations

import logging
import tempfile
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path

from transformers.dynamic_module_utils import get_relative_imports

from . import publish_adapter
from .adapter_card import adapter_card_info, render_adapter_card
from .cards import CardInfo, fam_card_info, render_model_card
from .checkpoint import read_config
from .inspection import REFRESH_COMMAND, verify_checkpoint
from .run_records import public_run_records

logger = logging.getLogger(__name__)

CARD_NAME = "README.md"
DEFAULT_COMMIT_MESSAGE = "Upload FAM checkpoint"
DEFAULT_ADAPTER_COMMIT_MESSAGE = "Upload LoRA adapter for a FAM checkpoint"
HTTP_CLIENTS = ("httpx", "httpx2", "requests", "urllib3")  # what huggingface_hub releases send requests with


def push_to_hub(
    checkpoint,
    repo_id: str,
    *,
    tokenizer=None,
    base_model: str | None = None,
    base_revision: str | None = None,
    commit_message: str | None = None,
    commit_description: str | None = None,
    private: bool | None = None,
    token: bool | str | None = None,
    revision: str | None = None,
    create_pr: bool = False,
    max_shard_size: int | str | None = "50GB",
    tags: list[str] | None = None,
    api=None,
):
    """Upload a FAM checkpoint folder, or a FAM model, to a Hub model repo (created if missing).

    Args:
        checkpoint: a local FAM checkpoint folder, or a `FAMForCausalLM` / model patched with `hf_fam.patch`; or
            a LoRA adapter of a FAM checkpoint: its folder, or the PeftModel.
        repo_id: "namespace/name", or "name" under the token's user.
        tokenizer: with a model, also saved and pushed (a folder carries its own tokenizer files).
        base_model: for an adapter, the Hub repo of its FAM base (pushed first), written into the pushed
            adapter_config.json; needed when the adapter names a local base (default: the base it names).
        base_revision: for an adapter, the branch, tag or commit of `base_model` it applies to (default: the
            revision the adapter names, else main); pinned as a commit in the pushed adapter_config.json.
        commit_message, commit_description, private, token, revision, create_pr: as in transformers'
            `push_to_hub` (revision: a branch, created if missing).
        max_shard_size: with a model, the largest weight file `save_pretrained` writes.
        tags: Hub tags for the card besides hf_fam's own.
        api: a `huggingface_hub.HfApi` (default: a new one with `token`).

    Returns:
        The `huggingface_hub.CommitInfo` of the commit (a str: its URL).

    Raises:
        FileNotFoundError: the folder does not exist.
        ValueError: not a FAM checkpoint, model or adapter, a folder that would not load elsewhere, or an adapter
            whose FAM base is not on the Hub; one line naming the fix. Nothing is uploaded.
        OSError: from the Hub (not logged in, offline, no write access).
    """
    commit = dict(tags=tags, api=api, token=token, private=private, revision=revision, create_pr=create_pr,
                  commit_message=commit_message, commit_description=commit_description)
    if isinstance(checkpoint, (str, Path)):
        if tokenizer is not None:
            raise ValueError("tokenizer= goes with a model; a folder is pushed with the tokenizer files it holds")
        folder = Path(checkpoint)
        if folder.is_dir() and publish_adapter.is_adapter_folder(folder):
            return _push_adapter_folder(folder, repo_id, base_model=base_model, base_revision=base_revision,
                                        **commit)
        if base_model is not None or base_revision is not None:
            raise ValueError(f"base_model= / base_revision= (--base-model / --base-revision) go with a LoRA adapter; "
                             f"{folder} is not one")
        return _push_folder(folder, repo_id, card=None, **commit)
    is_peft = _check_model(checkpoint)
    if not is_peft and (base_model is not None or base_revision is not None):
        raise ValueError("base_model= / base_revision= (--base-model / --base-revision) go with a LoRA adapter (a "
                         "PeftModel); this is a FAM model")
    with tempfile.TemporaryDirectory(prefix="hf_fam_push_") as tmp:
        folder = Path(tmp)
        if is_peft:
            checkpoint.save_pretrained(folder)
        else:
            checkpoint.save_pretrained(folder, max_shard_size=max_shard_size)
        if tokenizer is not None:
            tokenizer.save_pretrained(folder)
        if is_peft:
            return _push_adapter_folder(folder, repo_id, base_model=base_model, base_revision=base_revision,
                                        **commit)
        return _push_folder(folder, repo_id, card=_model_card_info(checkpoint), **commit)


def check_pushable(folder: str | Path) -> list[str]:
    """Raise a one-line error unless `folder` is a FAM checkpoint that loads elsewhere: config.json a FAMConfig,
    every weight present with its shape and dtype, and every code file its auto_map reaches (by relative import)
    present. Code that differs from the installed hf_fam's (another hf_fam release, or edited) loads as it is:
    those differences are returned, one line each, to be reported rather than refused."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder} is not a folder; pass a FAM checkpoint folder (from hf-fam convert)")
    if publish_adapter.is_adapter_folder(folder):
        raise ValueError(f"{folder} holds a LoRA adapter, not a FAM checkpoint: push_to_hub({str(folder)!r}, "
                         "repo_id, base_model=...) checks an adapter and its base")
    problems = verify_checkpoint(folder)  # raises for a folder without config.json or with another model type
    notes = [p for p in problems if p.startswith(("code:", "config: auto_map"))]
    fatal = [p for p in problems if p not in notes] + _missing_code(folder)
    if fatal:
        raise ValueError(
            f"{folder} would not load elsewhere ({len(fatal)} problem(s); `hf-fam verify {folder}` explains), "
            f"first: {fatal[0]}"
        )
    return notes


def _missing_code(folder: Path) -> list[str]:
    """The code files that loading `folder` with trust_remote_code needs and it lacks: the modules its auto_map
    names for AutoConfig and AutoModelForCausalLM, and those they import relatively (read by transformers' own
    `get_relative_imports`, which loading follows)."""
    auto_map = read_config(folder).get("auto_map") or {}
    refs = [auto_map.get(name) for name in ("AutoConfig", "AutoModelForCausalLM")]
    if not all(isinstance(ref, str) for ref in refs):
        return [f"config: auto_map names no AutoConfig and AutoModelForCausalLM classes; `{REFRESH_COMMAND} "
                f"{folder}` writes the installed hf_fam's code and auto_map"]
    todo, seen, missing = {ref.split(".")[0] for ref in refs}, set(), []
    while todo:
        module = todo.pop()
        seen.add(module)
        path = folder / f"{module}.py"
        if not path.is_file():
            missing.append(f"code: {path.name} is missing (imported by the checkpoint's code); `{REFRESH_COMMAND} "
                           f"{folder}` writes the installed hf_fam's")
            continue
        todo.update(name for name in get_relative_imports(str(path)) if name not in seen)
    return missing


def _push_folder(folder: Path, repo_id: str, *, card: CardInfo | None, tags, api, token, private, revision,
                 create_pr, commit_message, commit_description):
    from huggingface_hub import CommitOperationAdd, HfApi

    for note in check_pushable(folder):
        logger.warning("%s: %s; its own code goes up as it is", folder, note)
    files = sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith("."))
    api = api if api is not None else HfApi(token=token)
    with _hub_errors(repo_id):
        repo_id = api.create_repo(repo_id, token=token, private=private, exist_ok=True).repo_id
        card_text = _card_text(folder, repo_id, card, tags or [])
        rewritten = public_run_records(folder)  # a --full run's records, without its local paths
        operations = [CommitOperationAdd(path_in_repo=p.name, path_or_fileobj=str(p)) for p in files
                      if not (card_text is not None and p.name == CARD_NAME) and p.name not in rewritten]
        operations += [CommitOperationAdd(path_in_repo=name, path_or_fileobj=data) for name, data in rewritten.items()]
        if card_text is not None:
            operations.append(CommitOperationAdd(path_in_repo=CARD_NAME, path_or_fileobj=card_text.encode("utf-8")))
        return _commit(api, repo_id, operations, token=token, revision=revision, create_pr=create_pr,
                       commit_message=commit_message or DEFAULT_COMMIT_MESSAGE, commit_description=commit_description)


def _push_adapter_folder(folder: Path, repo_id: str, *, base_model: str | None, base_revision: str | None, tags, api,
                         token, private, revision, create_pr, commit_message, commit_description):
    """Push a LoRA adapter folder once its FAM base is on the Hub (`publish_adapter.resolve_base`)."""
    from huggingface_hub import CommitOperationAdd, HfApi

    api = api if api is not None else HfApi(token=token)
    with _hub_errors(repo_id):
        base = publish_adapter.resolve_base(folder, base_model, base_revision=base_revision, api=api, token=token)
        repo_id = api.create_repo(repo_id, token=token, private=private, exist_ok=True).repo_id
        replace_card = publish_adapter.card_is_replaceable(folder)
        rewritten = {publish_adapter.ADAPTER_CONFIG: publish_adapter.adapter_config_bytes(folder, base),
                     **public_run_records(folder, base_model=base.repo_id)}  # no local paths; the base's repo
        operations = [CommitOperationAdd(path_in_repo=p.name, path_or_fileobj=str(p))
                      for p in publish_adapter.adapter_files(folder)
                      if p.name not in rewritten and not (replace_card and p.name == CARD_NAME)]
        operations += [CommitOperationAdd(path_in_repo=name, path_or_fileobj=data) for name, data in rewritten.items()]
        if replace_card:  # what the folder's hf_fam card records (results, license, tags), the caller's tags
            info = adapter_card_info(folder, base.local)
            info = replace(info, tags=list(dict.fromkeys(info.tags + (tags or []))))
            text = render_adapter_card(folder, repo_id=repo_id, base_model=base.repo_id, base_config=base.config,
                                       info=info, base_revision=base.revision)
            operations.append(CommitOperationAdd(path_in_repo=CARD_NAME, path_or_fileobj=text.encode("utf-8")))
        elif tags:
            logger.warning("%s is not a card hf_fam wrote: uploaded as it is, without the tags %s",
                           folder / CARD_NAME, tags)
        return _commit(api, repo_id, operations, token=token, revision=revision, create_pr=create_pr,
                       commit_message=commit_message or DEFAULT_ADAPTER_COMMIT_MESSAGE,
                       commit_description=commit_description)


def _commit(api, repo_id: str, operations, *, token, revision, create_pr, commit_message, commit_description):
    if revision is not None and not revision.startswith("refs/pr"):
        api.create_branch(repo_id, branch=revision, token=token, exist_ok=True)
    logger.info("uploading %d files to %s: %s", len(operations), repo_id,
                ", ".join(op.path_in_repo for op in operations))
    return api.create_commit(repo_id, operations, commit_message=commit_message,
                             commit_description=commit_description, token=token, revision=revision,
                             create_pr=create_pr)


@contextmanager
def _hub_errors(repo_id: str):
    """The Hub's own errors (HTTP status, offline mode, no token) are OSErrors already; the HTTP client's
    (no network, name not resolved) depend on the huggingface_hub release and are not: made a ConnectionError."""
    try:
        yield
    except OSError:
        raise
    except Exception as err:
        if type(err).__module__.split(".")[0] not in HTTP_CLIENTS:
            raise
        raise ConnectionError(f"cannot reach the Hub to push to {repo_id} ({type(err).__name__}: {err}); "
                              "check the network, or set HF_ENDPOINT") from err


def _card_text(folder: Path, repo_id: str, card: CardInfo | None, tags: list[str]) -> str | None:
    """The README.md to upload: hf_fam's card rendered for `repo_id`, or None to upload the folder's own."""
    path = folder / CARD_NAME
    if path.is_file():
        card = fam_card_info(folder)
        if card is None:  # the user's own card
            if tags:
                logger.warning("%s is not a card hf_fam wrote: uploaded as it is, without the tags %s", path, tags)
            return None
    info = card or CardInfo()
    return render_model_card(folder, replace(info, repo_id=repo_id, tags=list(dict.fromkeys(info.tags + tags))))


def _check_model(model) -> bool:
    """Refuse what is neither a FAM model nor a PeftModel of one; True for a PeftModel."""
    if hasattr(model, "peft_config") and hasattr(model, "get_base_model"):
        base = model.get_base_model()
        if not hasattr(base, "fam_settings"):
            raise ValueError(f"a PEFT model of a {type(base).__name__}, not of a FAM model: an adapter of hf_fam's "
                             "is trained on a FAM checkpoint (hf-fam convert, then PEFT)")
        return True
    if not hasattr(model, "fam_settings") or not hasattr(model, "save_pretrained"):
        raise ValueError(
            f"{type(model).__name__} is not a FAM model: load a FAM checkpoint, or hf_fam.patch(model, ...) first"
        )
    return False


def _model_card_info(model) -> CardInfo:
    """What a model's card can say: the card of the folder it was loaded from, if hf_fam wrote one; the Hub id
    of the base model for a patched model loaded from the Hub."""
    source = getattr(model, "name_or_path", "") or ""
    path = Path(source).expanduser() if source else None
    if path is not None and path.is_dir():
        return fam_card_info(path) or CardInfo()
    from .hub import looks_like_repo_id

    patched = getattr(model, "_fam_original_class", None) is not None
    return CardInfo(base_model=source) if patched and source and looks_like_repo_id(source) else CardInfo()


__all__ = ["check_pushable", "push_to_hub"]
