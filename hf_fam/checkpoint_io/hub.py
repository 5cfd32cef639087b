"""SRC as a local folder, or a Hub repo id downloaded with `huggingface_hub.snapshot_download` (what `convert` reads).

Only what the conversion reads or carries is fetched; every failure (gated, private or missing repo, unknown
revision, offline without a cached copy) is one line saying what to do.
"""

from __future__ import annotations

from pathlib import Path

# what to fetch from the Hub: everything the conversion reads or carries, nothing else (no original/*.pth,
# no consolidated.safetensors duplicates, no other frameworks' weights)
HUB_PATTERNS = ["*.json", "*.safetensors", "*.model", "*.tiktoken", "*.txt", "*.md", "*.jinja", "LICENSE*",
                "LICENCE*", "NOTICE*", "USE_POLICY*", "COPYING*", "vocab.*", "merges.txt"]
HUB_IGNORE = ["original/*", "consolidated*", "*/*"]


def resolve_source(src: str | Path, revision: str | None = None, token: str | None = None,
                   allow_pickle: bool = False) -> tuple[Path, str | None]:
    """A local folder as is, or a Hub repo id downloaded with `huggingface_hub.snapshot_download`.

    Args:
        src: a folder, or a Hub id such as "meta-llama/Llama-3.2-1B".
        revision: Hub branch, tag or commit (Hub ids only).
        token: Hub token for private or gated repos (default: the stored login / HF_TOKEN).
        allow_pickle: also fetch `pytorch_model*.bin` when the repo has no safetensors weights.

    Returns:
        (the local folder, the Hub id or None).

    Raises:
        FileNotFoundError / ValueError: one line saying what is wrong and what to do.
    """
    path = Path(src).expanduser()
    if path.exists():
        if not path.is_dir():
            raise ValueError(f"SRC {src} is a file; pass the checkpoint's folder (with config.json) or a Hub id")
        if revision:
            raise ValueError(f"--revision applies to a Hub id; {src} is a local folder")
        return path, None
    if not looks_like_repo_id(str(src)):
        raise FileNotFoundError(f"SRC {src}: no such folder (and not a Hub repo id)")
    folder = _download(str(src), revision, token, HUB_PATTERNS)
    if allow_pickle and not any(folder.glob("*.safetensors")):
        folder = _download(str(src), revision, token, HUB_PATTERNS + ["pytorch_model*.bin"])
    return folder, str(src)


def looks_like_repo_id(src: str) -> bool:
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    if src.startswith((".", "/", "~")) or src.count("/") > 1:
        return False
    try:
        validate_repo_id(src)
    except HFValidationError:
        return False
    return True


def _download(repo_id: str, revision: str | None, token: str | None, patterns: list[str]) -> Path:
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    try:
        return Path(snapshot_download(repo_id=repo_id, revision=revision, token=token,
                                      allow_patterns=patterns, ignore_patterns=HUB_IGNORE))
    except GatedRepoError:
        raise ValueError(
            f"{repo_id} is gated: accept its terms on the Hub, then pass --token (or set HF_TOKEN)"
        ) from None
    except RepositoryNotFoundError:
        raise FileNotFoundError(
            f"{repo_id} is neither a local folder nor a Hub repo you can access (private? pass --token)"
        ) from None
    except RevisionNotFoundError:
        raise ValueError(f"{repo_id} has no revision {revision!r}") from None
    except LocalEntryNotFoundError:
        why = "HF_HUB_OFFLINE is set" if constants.HF_HUB_OFFLINE else "the Hub cannot be reached"
        raise FileNotFoundError(
            f"{repo_id} is not a local folder and is not in the Hub cache, and {why}; "
            "pass a local checkpoint folder or retry with network access"
        ) from None
    except HfHubHTTPError as err:
        raise ValueError(f"downloading {repo_id} failed: {' '.join(str(err).split())[:300]}") from None
