"""hf_fam: TransformerFAM (Feedback Attention Memory) for Hugging Face Transformers.

`import hf_fam` registers `FAMConfig` (model_type "fam") with AutoConfig, `FAMModel` (the backbone) with
AutoModel, `FAMForCausalLM` with AutoModelForCausalLM, `FAMForSequenceClassification` with
AutoModelForSequenceClassification and `FAMForTokenClassification` with AutoModelForTokenClassification.

The `hf-fam` command line is the one exception: importing torch and transformers takes seconds, so when
this interpreter was started as `hf-fam` (or `python -m hf_fam.cli`) the package only parses arguments
first; `hf_fam.cli.main` calls `load()` before a command runs, and any public name below loads it too.

The package's parts, one folder each: `modeling/` (what a FAM checkpoint ships as its remote code), `runtime/`
(patch, load, stream), `checkpoint_io/` (convert, inspect, verify, model cards), `tasks/` (the passkey task),
`training/`, `evaluation/`, `apps/` (demo, bench) and `cli/` (the `hf-fam` command line); `tiny.py` builds the
tiny models the tests, demo, bench and notebooks use. Modules that moved keep their old names as deprecated
aliases (`hf_fam/_moved.py`).
"""

from __future__ import annotations

import os
import sys

from . import _moved

_moved.install()  # the old names of moved modules (hf_fam.convert, ...), each with a DeprecationWarning

__version__ = "0.1.0"

__all__ = ["FAMCache", "FAMConfig", "FAMForCausalLM", "FAMForSequenceClassification", "FAMForTokenClassification",
           "FAMModel", "FAMSettings", "patch", "supported_model_types", "unpatch", "__version__"]

_loaded = False


def load() -> None:
    """Import the modelling code and register the `fam` model type with the Auto classes (idempotent)."""
    global _loaded, FAMCache, FAMConfig, FAMForCausalLM, FAMForSequenceClassification, FAMForTokenClassification
    global FAMModel, FAMSettings, patch, supported_model_types, unpatch
    if _loaded:
        return
    import transformers
    from transformers import AutoConfig

    from .modeling import modeling_fam
    from .modeling.configuration_fam import AUTO_MAP, FAMConfig
    from .modeling.fam_adapters import supported_model_types
    from .modeling.fam_cache import FAMCache
    from .modeling.fam_settings import FAMSettings
    from .modeling.modeling_fam import (
        FAMForCausalLM,
        FAMForSequenceClassification,
        FAMForTokenClassification,
        FAMModel,
    )
    from .runtime.patching import patch, unpatch

    AutoConfig.register("fam", FAMConfig, exist_ok=True)
    for auto_class, ref in AUTO_MAP.items():  # every model class a checkpoint's auto_map names
        if auto_class != "AutoConfig":
            getattr(transformers, auto_class).register(FAMConfig, getattr(modeling_fam, ref.split(".")[-1]),
                                                       exist_ok=True)
    _loaded = True


def __getattr__(name: str):
    if name in __all__:
        load()
        return globals()[name]
    raise AttributeError(f"module 'hf_fam' has no attribute {name!r}")


def _started_as_cli() -> bool:
    """True in an interpreter started as the `hf-fam` console script or as `python -m hf_fam.cli`."""
    argv = getattr(sys, "orig_argv", sys.argv)
    if "-m" in argv[:-1] and argv[argv.index("-m") + 1] == "hf_fam.cli":
        return True
    return bool(sys.argv) and os.path.basename(sys.argv[0]).split(".")[0] in ("hf-fam", "hf-fam-script")


if not _started_as_cli():
    load()
