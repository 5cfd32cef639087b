"""Write a folder all at once or not at all: build it in a hidden temporary folder next to the target, then move
it into place (`hf-fam convert`, and `hf-fam finetune`'s output)."""

from __future__ import annotations

import os
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def staging_folder(out: Path, force: bool = False) -> Iterator[Path]:
    """A hidden temporary folder next to `out`, moved to `out` when the block succeeds, removed otherwise.

    Parent folders it had to create are removed on failure too; an existing `out` is replaced only with
    `force`, and only once the new one is complete.
    """
    created = [p for p in [out.parent, *out.parent.parents] if not p.exists()]
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".fam-tmp", dir=out.parent))
    try:
        yield tmp
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes it private; OUT gets the usual permissions
        _move_into_place(tmp, out, force)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        for path in created:  # innermost first
            try:
                path.rmdir()
            except OSError:
                break
        raise


def _move_into_place(tmp: Path, out: Path, force: bool) -> None:
    if not out.exists():
        os.replace(tmp, out)
        return
    if not force:
        raise FileExistsError(f"{out} already exists; pass --force to replace it")
    old = out.parent / f".{out.name}.{uuid.uuid4().hex[:8]}.fam-old"
    os.rename(out, old)
    try:
        os.replace(tmp, out)
    except BaseException:
        os.rename(old, out)
        raise
    shutil.rmtree(old, ignore_errors=True)
