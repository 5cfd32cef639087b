"""Helpers for the conversion tests: tiny base checkpoints, folder hashes, and a fresh-process loader."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import textwrap
from pathlib import Path

from hf_fam.tiny import make_tiny_checkpoint

FAMILIES = ("llama", "mistral", "gemma")
LAYOUTS = ("single", "sharded")
# larger weights than the default 0.02 make attention far from uniform, so logits depend on fam_init
INIT_RANGE = 0.2


def make_source(folder: Path, family: str, layout: str = "single", **overrides) -> Path:
    """A tiny base checkpoint saved with save_pretrained: one model.safetensors, or 50 KB shards + index."""
    shard = "50KB" if layout == "sharded" else None
    return make_tiny_checkpoint(folder, family, safe_serialization_max_shard_size=shard,
                                initializer_range=INIT_RANGE, **overrides)


def tree_hashes(folder: Path) -> dict[str, str]:
    """relative path -> sha256 of every file under `folder` (and nothing about mtimes)."""
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*")) if p.is_file()
    }


def run_without_hf_fam(script: str, cwd: Path, timeout: int = 600) -> subprocess.CompletedProcess:
    """Run `script` in a fresh interpreter where `import hf_fam` fails; remote code is cached under cwd.

    A call that would stop at transformers' "run the custom code? [y/N]" prompt ends the script with an error.
    """
    prelude = textwrap.dedent(
        """
        import builtins, sys
        sys.modules["hf_fam"] = None  # `import hf_fam` fails in this process

        def _no_prompt(message=""):  # transformers asks "Do you wish to run the custom code?" when a
            raise SystemExit("interactive prompt: " + str(message)[-300:])  # call lacks trust_remote_code=True

        builtins.input = _no_prompt
        try:
            import hf_fam
            raise SystemExit("hf_fam importable")
        except ImportError:
            pass
        """
    )
    env = {**os.environ, "HF_MODULES_CACHE": str(cwd / "hf_modules"), "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-c", prelude + textwrap.dedent(script)], capture_output=True, text=True,
                          cwd=str(cwd), env=env, timeout=timeout)
