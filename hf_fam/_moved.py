"""The modules that moved when the package was laid out in folders (issue 18), still importable by their old names.

`import hf_fam.convert` (or `from hf_fam.convert import convert`) gives the module at its new place,
`hf_fam.checkpoint_io.convert`, the same module object, after one `DeprecationWarning` naming the new path. The
old names need no files of their own: `hf_fam/__init__.py` puts `MovedModuleFinder` in front of `sys.meta_path`,
where it answers only for the names in `MOVED` (and the submodules of a moved package). This module imports
nothing heavy: it runs on every `import hf_fam`, the `hf-fam` command line's fast start included.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys
import warnings

# old module name -> new module name
MOVED = {
    "hf_fam.bench": "hf_fam.apps.bench",
    "hf_fam.cards": "hf_fam.checkpoint_io.cards",
    "hf_fam.checkpoint": "hf_fam.checkpoint_io.checkpoint",
    "hf_fam.commands": "hf_fam.cli.commands",
    "hf_fam.commands.fam_args": "hf_fam.cli.fam_args",
    "hf_fam.convert": "hf_fam.checkpoint_io.convert",
    "hf_fam.demo": "hf_fam.apps.demo",
    "hf_fam.fam_init": "hf_fam.checkpoint_io.fam_init",
    "hf_fam.gguf_source": "hf_fam.checkpoint_io.gguf_source",
    "hf_fam.inspection": "hf_fam.checkpoint_io.inspection",
    "hf_fam.loading": "hf_fam.runtime.loading",
    "hf_fam.patching": "hf_fam.runtime.patching",
    "hf_fam.safetensors_io": "hf_fam.checkpoint_io.safetensors_io",
    "hf_fam.sink_baseline": "hf_fam.evaluation.sink_baseline",
    "hf_fam.streaming": "hf_fam.runtime.streaming",
    "hf_fam.training.passkey": "hf_fam.tasks.passkey",
}


def new_name(old: str) -> str | None:
    """Where the module once called `old` lives now; None where `old` did not move."""
    if old in MOVED:
        return MOVED[old]
    package, _, child = old.rpartition(".")
    while package:  # a submodule of a moved package: hf_fam.commands.eval -> hf_fam.cli.commands.eval
        if package in MOVED:
            return f"{MOVED[package]}.{old[len(package) + 1:]}"
        package, _, child = package.rpartition(".")
    return None


class _MovedModuleLoader(importlib.abc.Loader):
    def __init__(self, new: str):
        self.new = new

    def create_module(self, spec):
        return None  # a placeholder module; exec_module puts the real one in its place

    def exec_module(self, module) -> None:
        old = module.__name__
        warnings.warn(f"{old} is deprecated: import {self.new} (the package was laid out in folders)",
                      DeprecationWarning, stacklevel=2)
        # importlib returns whatever sys.modules holds under the name once this returns (and binds it in the
        # parent package), so the old name becomes the moved module itself: no second copy, no second state.
        sys.modules[old] = importlib.import_module(self.new)


class MovedModuleFinder(importlib.abc.MetaPathFinder):
    """Finds the old names of moved modules (see `MOVED`); every other name is left to the ordinary finders."""

    def find_spec(self, fullname, path=None, target=None):
        if not fullname.startswith("hf_fam."):
            return None
        new = new_name(fullname)
        if new is None or importlib.util.find_spec(new) is None:
            return None
        return importlib.util.spec_from_loader(fullname, _MovedModuleLoader(new))


def install() -> None:
    """Put the finder in front of `sys.meta_path` (idempotent)."""
    if not any(isinstance(finder, MovedModuleFinder) for finder in sys.meta_path):
        sys.meta_path.insert(0, MovedModuleFinder())
