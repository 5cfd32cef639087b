"""A stand-in for the Hub, for the tests of sharing (no hub is reachable here).

`FakeHub` takes `huggingface_hub.HfApi`'s calls that pushing makes and keeps what each commit adds, in a folder
per repo: what the Hub would serve. `hub_cache` lays those folders out as a Hugging Face cache, so that loading a
repo id with `HF_HUB_OFFLINE=1` and `HF_HUB_CACHE` set resolves it as a download would have.
"""

from __future__ import annotations

import io
import shutil
from pathlib import Path
from types import SimpleNamespace

CACHE_COMMIT = "0" * 40


class FakeHub:
    """Takes HfApi's create_repo / create_branch / create_commit / hf_hub_download, repo by repo."""

    def __init__(self, root: Path, user: str = "me"):
        self.root, self.user, self.calls = root, user, []

    def create_repo(self, repo_id, *, token=None, private=None, exist_ok=False, **kwargs):
        repo_id = repo_id if "/" in repo_id else f"{self.user}/{repo_id}"
        self.calls.append(("create_repo", repo_id, private))
        return SimpleNamespace(repo_id=repo_id)

    def create_branch(self, repo_id, *, branch, token=None, exist_ok=False, **kwargs):
        self.calls.append(("create_branch", repo_id, branch))

    def create_commit(self, repo_id, operations, *, commit_message, commit_description=None, token=None,
                      revision=None, create_pr=False, **kwargs):
        self.calls.append(("create_commit", repo_id, commit_message, revision, create_pr))
        folder = self.repo(repo_id)
        folder.mkdir(parents=True, exist_ok=True)
        for op in operations:
            source = op.path_or_fileobj
            if isinstance(source, (str, Path)):
                data = Path(source).read_bytes()
            elif isinstance(source, bytes):
                data = source
            else:
                data = source.read() if isinstance(source, io.IOBase) else bytes(source)
            (folder / op.path_in_repo).write_bytes(data)
        return SimpleNamespace(commit_url=f"https://huggingface.co/{repo_id}/commit/0", pr_url=None)

    def hf_hub_download(self, repo_id, filename, *, token=None, **kwargs):
        """As the Hub answers: the errors huggingface_hub raises for a repo or a file that is not there."""
        from huggingface_hub.errors import EntryNotFoundError, RepositoryNotFoundError

        self.calls.append(("hf_hub_download", repo_id, filename))
        folder = self.repo(repo_id)
        if not folder.is_dir():
            response = SimpleNamespace(headers={}, request=None, status_code=404)  # what the error reads of it
            raise RepositoryNotFoundError(f"404 Client Error: Repository Not Found for {repo_id}", response=response)
        if not (folder / filename).is_file():
            raise EntryNotFoundError(f"404 Client Error: Entry Not Found for {repo_id}/{filename}")
        return str(folder / filename)

    def repo(self, repo_id: str) -> Path:
        return self.root / repo_id.replace("/", "--")

    def committed(self) -> bool:
        return any(call[0] == "create_commit" for call in self.calls)


def hub_cache(hub: FakeHub, cache: Path) -> Path:
    """Lay out every repo of `hub` as a Hugging Face cache at one commit (`models--NS--NAME/snapshots/COMMIT`), with
    the marker a 404 for config.json leaves in a repo that has none (an adapter's); returns `cache`."""
    for repo in hub.root.iterdir():
        entry = cache / f"models--{repo.name}"
        (entry / "refs").mkdir(parents=True, exist_ok=True)
        (entry / "refs" / "main").write_text(CACHE_COMMIT)
        shutil.copytree(repo, entry / "snapshots" / CACHE_COMMIT, dirs_exist_ok=True)
        if not (repo / "config.json").is_file():
            (entry / ".no_exist" / CACHE_COMMIT).mkdir(parents=True, exist_ok=True)
            (entry / ".no_exist" / CACHE_COMMIT / "config.json").touch()
    return cache
