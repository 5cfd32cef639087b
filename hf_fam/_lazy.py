"""Names a package loads on first use (PEP 562), so that a light submodule (options read by `--help`) can be
imported without the heavy ones (torch, PEFT) its package also exports."""

from __future__ import annotations

import importlib
import sys


def lazy_exports(package: str, exports: dict[str, str]):
    """The `__getattr__` and `__dir__` of `package`, whose name `n` is defined in module `exports[n]` (relative
    to the package, or absolute); a name is imported once, then kept in the package's namespace."""

    def __getattr__(name: str):
        if name not in exports:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(exports[name], package), name)
        vars(sys.modules[package])[name] = value
        return value

    def __dir__() -> list[str]:
        return sorted(set(vars(sys.modules[package])) | set(exports))

    return __getattr__, __dir__
