"""What a checkpoint folder holds, read without loading any weights.

A Hugging Face checkpoint folder holds `config.json` and its weights: one `model.safetensors`, or shards
listed in `model.safetensors.index.json` (or the pickle equivalents, `pytorch_model*.bin`). This module
finds those files, reads the tensors' names, shapes and dtypes from the safetensors headers, and derives
from a config what the tensors *should* be, by building the model on PyTorch's meta device (no memory,
no weights). Conversion, `hf-fam inspect` and `hf-fam verify` are built on it.

Example:
```python
>>> files = find_weight_files("Llama-3.2-1B")
>>> found = read_safetensors_tensors(files)
>>> expected = expected_tensors(AutoConfig.from_pretrained("Llama-3.2-1B"))
>>> compare_tensors(found, expected.tensors)
[]
```
"""

from __future__ import annotations

import ast
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..modeling.configuration_fam import AUTO_MAP  # noqa: F401  (one source; re-exported for convert and verify)
from .safetensors_io import TensorInfo, read_header

CONFIG_NAME = "config.json"
SAFE_WEIGHTS_NAME = "model.safetensors"
SAFE_INDEX_NAME = "model.safetensors.index.json"
PICKLE_WEIGHTS_NAME = "pytorch_model.bin"
PICKLE_INDEX_NAME = "pytorch_model.bin.index.json"
FAM_INIT_KEY = "fam.fam_init"
# config.json entries that let `from_pretrained(..., trust_remote_code=True)` find the remote code
MODELING_DIR = Path(__file__).resolve().parents[1] / "modeling"


# --- config ---------------------------------------------------------------------------------------------
def read_config(folder: str | Path) -> dict:
    """The folder's config.json as a dict.

    Raises:
        FileNotFoundError: no config.json (one line, with what to do).
        ValueError: config.json is not valid JSON or has no model_type.
    """
    path = Path(folder) / CONFIG_NAME
    if not path.is_file():
        adapter = Path(folder) / "adapter_config.json"
        if adapter.is_file():  # a PEFT adapter: the model is its base
            try:
                base = json.loads(adapter.read_text()).get("base_model_name_or_path") or "its base"
            except ValueError:
                base = "its base"
            raise FileNotFoundError(f"no config.json in {folder}: it holds a LoRA adapter (adapter_config.json); "
                                    f"point at the checkpoint it applies to, {base}")
        raise FileNotFoundError(
            f"no config.json in {folder}: point at a Hugging Face checkpoint folder (config.json + weights)"
        )
    try:
        config = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} is not valid JSON ({err.msg}, line {err.lineno}); re-download it") from None
    if not isinstance(config, dict) or "model_type" not in config:
        raise ValueError(f"{path} has no model_type: it is not a transformers model config")
    return config


# --- weight files ---------------------------------------------------------------------------------------
@dataclass
class WeightFiles:
    """A checkpoint's weight files.

    Attributes:
        kind: "safetensors" or "pickle".
        files: the weight files, in name order.
        index: the index's `weight_map` (tensor name -> file name) for a sharded checkpoint, else None.
        index_metadata: the index's `metadata` (total_size, ...), else {}.
    """

    kind: str
    files: list[Path]
    index: dict[str, str] | None = None
    index_metadata: dict = field(default_factory=dict)

    @property
    def sharded(self) -> bool:
        return self.index is not None


def find_weight_files(folder: str | Path) -> WeightFiles:
    """Locate the weights as transformers would: a single file first, else an index and its shards.

    Raises:
        FileNotFoundError: no weights, or a shard the index names is missing (naming it).
        ValueError: the index is not valid JSON.
    """
    folder = Path(folder)
    for kind, single, index_name in (
        ("safetensors", SAFE_WEIGHTS_NAME, SAFE_INDEX_NAME),
        ("pickle", PICKLE_WEIGHTS_NAME, PICKLE_INDEX_NAME),
    ):
        if (folder / single).is_file():
            return WeightFiles(kind, [folder / single])
        index_path = folder / index_name
        if index_path.is_file():
            try:
                index = json.loads(index_path.read_text())
                weight_map = dict(index["weight_map"])
            except (json.JSONDecodeError, KeyError, TypeError, ValueError):
                raise ValueError(f"{index_path} is not a valid weight index (no weight_map); re-download it") from None
            names = sorted(set(weight_map.values()))
            for name in names:
                if not (folder / name).is_file():
                    raise FileNotFoundError(
                        f"missing shard {name} (listed in {index_name}) in {folder}; download the complete checkpoint"
                    )
            return WeightFiles(kind, [folder / n for n in names], weight_map, dict(index.get("metadata") or {}))
    raise FileNotFoundError(
        f"no weights in {folder}: expected {SAFE_WEIGHTS_NAME}, {SAFE_INDEX_NAME} with its shards, "
        f"or {PICKLE_WEIGHTS_NAME}(.index.json)"
    )


def read_safetensors_tensors(weights: WeightFiles) -> dict[str, TensorInfo]:
    """Every tensor of a safetensors checkpoint, from the headers only.

    Raises:
        ValueError: a corrupt or truncated shard; a tensor in two shards; a tensor the index places in a
            shard that does not hold it.
    """
    tensors: dict[str, TensorInfo] = {}
    for path in weights.files:
        found, _ = read_header(path)
        for name, info in found.items():
            if name in tensors:
                raise ValueError(f"tensor {name} is stored twice ({tensors[name].path.name} and {path.name})")
            tensors[name] = info
    for name, shard in (weights.index or {}).items():
        if name not in tensors or tensors[name].path.name != shard:
            raise ValueError(f"{shard} does not hold {name}, which the weight index places there; re-download {shard}")
    return tensors


# --- what the config implies ----------------------------------------------------------------------------
@dataclass(frozen=True)
class ExpectedTensor:
    shape: tuple[int, ...]
    dtype: torch.dtype


@dataclass
class ExpectedTensors:
    """The tensors a config's model saves, and where its token embedding is."""

    tensors: dict[str, ExpectedTensor]
    embedding_key: str


def expected_tensors(base_config, dtype: torch.dtype | None = None,
                     auto_class: str = "AutoModelForCausalLM") -> ExpectedTensors:
    """Names, shapes and dtypes of the tensors `save_pretrained` writes for a (base) causal LM config, or for the
    model `auto_class` (a transformers Auto class name, e.g. "AutoModelForSequenceClassification") builds from it.

    The model is built on the meta device: nothing is allocated. Tied weights appear once (under the
    input embedding's name) and non-persistent buffers (rotary frequencies, ...) not at all, as in a saved
    checkpoint.

    Args:
        base_config: a transformers config of a causal LM (a Llama, Mistral, Gemma ... config).
        dtype: the dtype the weights are stored in; defaults to the config's `dtype`, else float32.

    Returns:
        ExpectedTensors: name -> (shape, dtype), and the input embedding weight's name.

    Example:
    ```python
    >>> expected_tensors(LlamaConfig(num_hidden_layers=1)).tensors["model.embed_tokens.weight"].shape
    (32000, 4096)
    ```
    """
    import transformers

    dtype = dtype or _config_dtype(base_config) or torch.float32
    with torch.device("meta"):
        model = getattr(transformers, auto_class).from_config(base_config, dtype=dtype)
    persistent = set(model.state_dict().keys())
    tensors = {name: ExpectedTensor(tuple(p.shape), p.dtype) for name, p in model.named_parameters()}
    tensors.update(
        {name: ExpectedTensor(tuple(b.shape), b.dtype) for name, b in model.named_buffers() if name in persistent}
    )
    embedding = model.get_input_embeddings().weight
    embedding_key = next(name for name, p in model.named_parameters() if p is embedding)
    return ExpectedTensors(tensors, embedding_key)


def _config_dtype(config) -> torch.dtype | None:
    dtype = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype, None)
    return dtype if isinstance(dtype, torch.dtype) else None


def compare_tensors(
    found: dict[str, tuple[tuple[int, ...], torch.dtype | None]] | dict[str, TensorInfo],
    expected: dict[str, ExpectedTensor],
    check_dtype: bool = False,
) -> list[str]:
    """Differences between the tensors a checkpoint holds and those its config implies, one line each.

    Args:
        found: name -> TensorInfo, or name -> (shape, dtype).
        expected: from `expected_tensors`.
        check_dtype: also report dtypes that differ.

    Returns:
        Lines such as "missing tensor model.norm.weight", "model.norm.weight has shape (32,), config.json
        implies (64,)", "unexpected tensor x"; empty when everything matches.
    """
    problems = []
    for name, want in expected.items():
        if name not in found:
            problems.append(f"missing tensor {name} {want.shape}")
            continue
        shape, dtype = _shape_dtype(found[name])
        where = f" (in {found[name].path.name})" if isinstance(found[name], TensorInfo) else ""
        if shape != want.shape:
            problems.append(f"{name}{where} has shape {shape}, config.json implies {want.shape}")
        elif check_dtype and dtype != want.dtype:
            problems.append(f"{name}{where} is {_dtype_name(dtype)}, config.json says {_dtype_name(want.dtype)}")
    problems += [f"unexpected tensor {name}" for name in found if name not in expected]
    return problems


def _shape_dtype(value) -> tuple[tuple[int, ...], torch.dtype | None]:
    if isinstance(value, TensorInfo):
        return value.shape, value.torch_dtype
    return tuple(value[0]), value[1]


def _dtype_name(dtype: torch.dtype | None) -> str:
    return str(dtype).removeprefix("torch.") if dtype is not None else "an unknown dtype"


# --- remote code ----------------------------------------------------------------------------------------
def remote_code_files() -> list[Path]:
    """The installed hf_fam's remote-code files: what a FAM checkpoint carries next to config.json."""
    return sorted(p for p in MODELING_DIR.glob("*.py") if p.name != "__init__.py")


def compare_remote_code(folder: str | Path) -> dict[str, str]:
    """Compare a checkpoint's code files with the installed hf_fam's, byte for byte.

    Returns:
        file name -> "identical", "differs" or "missing", for every remote-code file.
    """
    folder = Path(folder)
    status = {}
    for ours in remote_code_files():
        theirs = folder / ours.name
        if not theirs.is_file():
            status[ours.name] = "missing"
        else:
            status[ours.name] = "identical" if theirs.read_bytes() == ours.read_bytes() else "differs"
    return status


# The range of transformers releases a copy of the remote code supports: `SUPPORTED_TRANSFORMERS` in its fam_compat.py
CODE_RANGE_FILE, CODE_RANGE_NAME = "fam_compat.py", "SUPPORTED_TRANSFORMERS"


def code_transformers_range(folder: str | Path) -> tuple[str, str] | None:
    """The (oldest, newest) transformers release a folder's remote code supports, read without importing it.

    None when the folder's fam_compat.py is missing or predates the range (hf_fam code that pinned one release).
    """
    path = Path(folder) / CODE_RANGE_FILE
    if not path.is_file():
        return None
    try:
        tree = ast.parse(path.read_text(encoding="utf-8"))
    except (SyntaxError, UnicodeDecodeError):
        return None
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == CODE_RANGE_NAME for t in node.targets):
            try:
                value = ast.literal_eval(node.value)
            except ValueError:
                return None
            if isinstance(value, tuple) and len(value) == 2 and all(isinstance(v, str) for v in value):
                return value
    return None


def remote_code_age(folder: str | Path) -> str:
    """How a checkpoint's remote code compares with the installed hf_fam's.

    Returns:
        "identical"; "older" (it supports an older or narrower range of transformers releases, or predates
        ranges); "newer" (it supports newer releases than the installed hf_fam); or "differs" (same range,
        other bytes: edited, or another build).
    """
    if all(status == "identical" for status in compare_remote_code(folder).values()):
        return "identical"
    from ..modeling.fam_compat import SUPPORTED_TRANSFORMERS, _minor

    theirs = code_transformers_range(folder)
    if theirs is None:
        return "older"
    (their_floor, their_ceiling), (our_floor, our_ceiling) = ((_minor(a), _minor(b)) for a, b in
                                                              (theirs, SUPPORTED_TRANSFORMERS))
    if their_ceiling > our_ceiling:
        return "newer"
    if their_ceiling < our_ceiling or their_floor > our_floor:
        return "older"
    return "differs"


def refresh_remote_code(folder: str | Path) -> list[str]:
    """Replace a checkpoint's remote-code files (and its config's auto_map) with the installed hf_fam's.

    Weights, the model card and every other config entry are left as they are. Each file is written next
    to its target and moved into place, so an interrupted refresh leaves whole files only.

    Returns:
        The names of the files written (empty when everything was already identical).
    """
    folder = Path(folder)
    written = []
    for ours in remote_code_files():
        target = folder / ours.name
        data = ours.read_bytes()
        if target.is_file() and target.read_bytes() == data:
            continue
        tmp = folder / f".{ours.name}.fam-tmp"
        tmp.write_bytes(data)
        os.replace(tmp, target)
        written.append(ours.name)
    config_path = folder / CONFIG_NAME
    config = read_config(folder)
    if config.get("auto_map") != AUTO_MAP:
        config["auto_map"] = dict(AUTO_MAP)
        tmp = folder / f".{CONFIG_NAME}.fam-tmp"
        tmp.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")
        os.replace(tmp, config_path)
        written.append(CONFIG_NAME)
    return written
