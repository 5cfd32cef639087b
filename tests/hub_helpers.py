"""A stand-in for the Hub, for the tests of sharing (no hub is reachable here).

`FakeHub` takes `huggingface_hub.HfApi`'s calls that pushing makes and keeps what each commit adds, in a folder
per repo: what the Hub would serve from main. Every state of a repo's files it has served or committed is kept as
a commit too, named by a hash of its files, so that an older commit stays readable after a later push.
`hub_cache` lays those commits out as a Hugging Face cache, so that loading a repo id with `HF_HUB_OFFLINE=1` and
`HF_HUB_CACHE` set resolves it as a download would have, main and pinned commits alike.
"""

from __future__ import annotations

import hashlib
import io
import shutil
from pathlib import Path
from types import SimpleNamespace


def _response():
    return SimpleNamespace(headers={}, request=None, status_code=404)  # what huggingface_hub's errors read of it


class FakeHub:
    """Takes HfApi's create_repo / create_branch / create_commit / model_info / hf_hub_download, repo by repo."""

    def __init__(self, root: Path, user: str = "me"):
        self.root, self.user, self.calls = root, user, []
        self.commits = root.with_name(root.name + "-commits")  # COMMITS/NS--NAME/SHA: each state of a repo

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
        sha = self.head(repo_id)
        return SimpleNamespace(commit_url=f"https://huggingface.co/{repo_id}/commit/{sha}", pr_url=None)

    def model_info(self, repo_id, *, revision=None, token=None, **kwargs):
        """The repo's commit at `revision` (main, or a commit kept), as `.sha`; the Hub's errors otherwise."""
        self.calls.append(("model_info", repo_id, revision))
        return SimpleNamespace(id=repo_id, sha=self._commit_folder(repo_id, revision).name)

    def hf_hub_download(self, repo_id, filename, *, revision=None, token=None, **kwargs):
        """As the Hub answers: the errors huggingface_hub raises for a repo, revision or file that is not there."""
        from huggingface_hub.errors import EntryNotFoundError

        self.calls.append(("hf_hub_download", repo_id, filename))
        folder = self._commit_folder(repo_id, revision)
        if not (folder / filename).is_file():
            raise EntryNotFoundError(f"404 Client Error: Entry Not Found for {repo_id}/{filename}")
        return str(folder / filename)

    def repo(self, repo_id: str) -> Path:
        """The folder of what main serves (tests may also write into it: that is a new commit)."""
        return self.root / repo_id.replace("/", "--")

    def head(self, repo_id: str) -> str:
        """Main's commit: the hash of the repo's files, kept as a commit folder."""
        folder = self.repo(repo_id)
        digest = hashlib.sha1()
        for path in sorted(p for p in folder.rglob("*") if p.is_file()):
            digest.update(str(path.relative_to(folder)).encode() + b"\0" + path.read_bytes() + b"\0")
        sha = digest.hexdigest()
        kept = self.commits / folder.name / sha
        if not kept.is_dir():
            shutil.copytree(folder, kept)
        return sha

    def _commit_folder(self, repo_id: str, revision) -> Path:
        from huggingface_hub.errors import RepositoryNotFoundError, RevisionNotFoundError

        if not self.repo(repo_id).is_dir():
            raise RepositoryNotFoundError(f"404 Client Error: Repository Not Found for {repo_id}",
                                          response=_response())
        head = self.head(repo_id)
        folder = self.commits / self.repo(repo_id).name / (head if revision in (None, "main") else revision)
        if not folder.is_dir():
            raise RevisionNotFoundError(f"404 Client Error: Revision Not Found for {repo_id}@{revision}",
                                        response=_response())
        return folder

    def committed(self) -> bool:
        return any(call[0] == "create_commit" for call in self.calls)


def hub_cache(hub: FakeHub, cache: Path) -> Path:
    """Lay out every repo of `hub` as a Hugging Face cache (`models--NS--NAME/snapshots/COMMIT`, every commit kept,
    refs/main at main's), with the marker a 404 for config.json leaves in a commit that has none (an adapter's);
    returns `cache`."""
    for repo in hub.root.iterdir():
        entry = cache / f"models--{repo.name}"
        (entry / "refs").mkdir(parents=True, exist_ok=True)
        (entry / "refs" / "main").write_text(hub.head(repo.name.replace("--", "/", 1)))
        for commit in (hub.commits / repo.name).iterdir():
            shutil.copytree(commit, entry / "snapshots" / commit.name, dirs_exist_ok=True)
            if not (commit / "config.json").is_file():
                (entry / ".no_exist" / commit.name).mkdir(parents=True, exist_ok=True)
                (entry / ".no_exist" / commit.name / "config.json").touch()
    return cache
