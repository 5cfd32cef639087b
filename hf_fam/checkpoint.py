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

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .modeling.configuration_fam import AUTO_MAP  # noqa: F401  (one source; re-exported for convert and verify)
from .safetensors_io import TensorInfo, read_header

CONFIG_NAME = "config.json"
SAFE_WEIGHTS_NAME = "model.safetensors"
SAFE_INDEX_NAME = "model.safetensors.index.json"
PICKLE_WEIGHTS_NAME = "pytorch_model.bin"
PICKLE_INDEX_NAME = "pytorch_model.bin.index.json"
FAM_INIT_KEY = "fam.fam_init"
# config.json entries that let `from_pretrained(..., trust_remote_code=True)` find the remote code
MODELING_DIR = Path(__file__).resolve().parent / "modeling"


# --- config ---------------------------------------------------------------------------------------------
def read_config(folder: str | Path) -> dict:
    """The folder's config.json as a dict.

    Raises:
        FileNotFoundError: no config.json (one line, with what to do).
        ValueError: config.json is not valid JSON or has no model_type.
    """
    path = Path(folder) / CONFIG_NAME
    if not path.is_file():
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


def expected_tensors(base_config, dtype: torch.dtype | None = None) -> ExpectedTensors:
    """Names, shapes and dtypes of the tensors `save_pretrained` writes for a (base) causal LM config.

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
    from transformers import AutoModelForCausalLM

    dtype = dtype or _config_dtype(base_config) or torch.float32
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(base_config, dtype=dtype)
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
