"""A base checkpoint folder opened for conversion and checked, without loading its weights.

`open_source` reads config.json and the weights' headers (or, for pickle weights, memory-maps them), refuses
what cannot be converted (an unsupported family, a FAM checkpoint, missing or corrupt shards, tensors that do
not match the config) and returns a `SourceCheckpoint`; `embedding_rows` reads single rows of its embedding.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from .checkpoint import (
    CONFIG_NAME,
    ExpectedTensors,
    WeightFiles,
    compare_tensors,
    expected_tensors,
    find_weight_files,
    read_config,
    read_safetensors_tensors,
)
from .safetensors_io import TensorInfo

if TYPE_CHECKING:
    from transformers import PretrainedConfig


class ExpertsStoredApart(ValueError):
    """A mixture of experts whose checkpoint holds each expert's weights apart (Mixtral, Qwen 2/3 MoE, OLMoE): the
    model's tensors exist only once transformers has loaded it (`convert` then loads it whole)."""


@dataclass
class SourceCheckpoint:
    """A base checkpoint, checked: supported family, all weights present, shapes match the config."""

    folder: Path
    hub_id: str | None
    base_config: PretrainedConfig
    weights: WeightFiles
    shapes: dict[str, tuple[tuple[int, ...], torch.dtype | None]]
    safetensors: dict[str, TensorInfo] | None
    expected: ExpectedTensors
    dropped: list[str]

    @property
    def embedding_dtype(self) -> torch.dtype:
        return self.shapes[self.expected.embedding_key][1]


def open_source(folder: Path, hub_id: str | None = None, allow_pickle: bool = False) -> SourceCheckpoint:
    """Read and check a base checkpoint folder without loading its weights.

    Raises:
        FileNotFoundError: no config.json, no weights, a missing shard.
        ValueError: unsupported architecture, an already converted checkpoint, pickle weights without
            `allow_pickle`, a corrupt or truncated shard, tensors that do not match the config.
    """
    from transformers import AutoConfig

    from ..modeling.fam_adapters import get_adapter

    raw = read_config(folder)
    if raw["model_type"] == "fam":
        raise ValueError(f"{folder} is already a FAM checkpoint; load it directly or convert its base model")
    adapter = get_adapter(raw["model_type"])  # unsupported family: names it and the supported ones
    try:
        base_config = AutoConfig.from_pretrained(str(folder))
    except Exception as err:  # transformers raises many kinds for a bad config
        raise ValueError(f"{folder / CONFIG_NAME} cannot be read as a {raw['model_type']} config: "
                         f"{' '.join(str(err).split())[:300]}") from None
    adapter.check_config(base_config)
    base_config._name_or_path = hub_id or folder.name  # no local path leaks into the published config

    weights = find_weight_files(folder)
    if weights.kind == "pickle":
        if not allow_pickle:
            raise ValueError(
                f"{folder} has only pickle weights ({weights.files[0].name}); pickle can run code when loaded. "
                "Pass --allow-pickle to read them with torch.load(weights_only=True)"
            )
        safetensors = None
        shapes = {}
        for path in weights.files:
            for name, tensor in load_pickle_weights(path).items():
                shapes[name] = (tuple(tensor.shape), tensor.dtype)
    else:
        safetensors = read_safetensors_tensors(weights)
        shapes = {name: (info.shape, info.torch_dtype) for name, info in safetensors.items()}

    expected = expected_tensors(base_config)
    problems = [p for p in compare_tensors(shapes, expected.tensors) if not p.startswith("unexpected")]
    if problems and adapter.experts:
        raise ExpertsStoredApart(f"{folder} stores each of {raw['model_type']}'s experts apart; transformers "
                                 "fuses them while loading, so the tensors cannot be copied as stored")
    if problems:
        raise weights_mismatch(folder, problems)
    dropped = sorted(name for name in shapes if name not in expected.tensors)
    return SourceCheckpoint(folder, hub_id, base_config, weights, shapes, safetensors, expected, dropped)


def weights_mismatch(folder: Path, problems: list[str]) -> ValueError:
    """The one-line error for weights that do not match the config: the first problem and how many more."""
    more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
    return ValueError(f"the weights in {folder} do not match its config.json: {problems[0]}{more}")


def load_pickle_weights(path: Path) -> dict[str, torch.Tensor]:
    """A .bin state dict, memory-mapped where the file format allows it; `weights_only=True` always."""
    try:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError:  # the legacy (non-zip) format cannot be memory-mapped
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise ValueError(f"{path.name} is corrupt or not a weights-only state dict ({type(err).__name__}); "
                         "re-download it") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{path.name} is not a state dict of tensors")
    return state


def embedding_rows(source: SourceCheckpoint, ids: list[int]) -> torch.Tensor:
    """Rows `ids` of the source's token-embedding matrix, read without loading the rest: (len(ids), hidden)."""
    key = source.expected.embedding_key
    if source.safetensors is None:
        path = source.weights.files[0] if not source.weights.sharded else source.folder / source.weights.index[key]
        return load_pickle_weights(path)[key][ids].clone()
    from safetensors import safe_open

    with safe_open(str(source.safetensors[key].path), framework="pt") as f:
        matrix = f.get_slice(key)
        return torch.cat([matrix[i : i + 1] for i in ids]) if ids else torch.empty(0, source.shapes[key][0][1])
