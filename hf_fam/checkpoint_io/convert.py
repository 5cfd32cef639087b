"""Convert a base checkpoint of a supported family (a Hub id, a local folder or a GGUF file) into a FAM checkpoint.

A FAM checkpoint is the base checkpoint with its weights unchanged, under the same names, plus one tensor,
`fam.fam_init` (F × hidden, in the weights' dtype); its `config.json` is a `FAMConfig` with `auto_map`, and
it carries hf_fam's remote-code files, so that `AutoModelForCausalLM.from_pretrained(OUT,
trust_remote_code=True)` loads it where hf_fam is not installed. The output is what
`FAMForCausalLM.save_pretrained` writes for the same model.

How the conversion stays safe and small:
- the model is never built: tensors are checked against the config from the safetensors headers (the
  model's shapes come from a meta-device model) and copied shard by shard as bytes, so peak memory stays
  at one copy buffer, far below one shard (`hf_fam.checkpoint_io.safetensors_io`); two exceptions: a GGUF file
  is dequantised by transformers into a temporary plain checkpoint first (`hf_fam.checkpoint_io.gguf_source`),
  and a mixture of experts stored one expert per tensor (Mixtral, Qwen 2/3 MoE, OLMoE) is loaded whole by transformers,
  which fuses the experts, then patched and saved (`_convert_loaded`; the same output);
- everything is checked before anything is written: config, supported family, every shard present and
  readable, every tensor's shape;
- the output is written into a hidden temporary folder next to OUT and moved into place at the end; a
  failure or an interrupt removes it, so OUT either is complete or does not exist. SRC is only read.

This module writes the output (weights, config, carried files, code, card); the steps before it live beside
it: `hub` resolves SRC (folder or Hub id), `gguf_source` turns a GGUF file into a folder, `source` opens and
checks the folder, `fam_init` builds the initial memory, and `staging` makes the write all or nothing.

Example:
```python
>>> from hf_fam.checkpoint_io.convert import ConvertOptions, convert
>>> convert("meta-llama/Llama-3.2-1B", "llama-fam", ConvertOptions(block_size=1024, memory_segments=3, fam_length=64))
```
"""

from __future__ import annotations

import json
import re
import shutil
from dataclasses import dataclass, field
from fnmatch import fnmatch
from pathlib import Path

import torch

from ..modeling.fam_settings import (
    DEFAULT_BLOCK_SIZE,
    DEFAULT_FAM_LAYERS,
    DEFAULT_FAM_LENGTH,
    DEFAULT_MEMORY_SEGMENTS,
    ZERO_SHOT_FAM_UPDATE,
)
from .checkpoint import (
    AUTO_MAP,
    CONFIG_NAME,
    FAM_INIT_KEY,
    SAFE_INDEX_NAME,
    remote_code_files,
)
from .fam_init import FamInitSpec, build_fam_init, sink_token_id
from .gguf_source import check_gguf, gguf_as_checkpoint, locate_gguf
from .hub import HUB_IGNORE, HUB_PATTERNS, resolve_source  # noqa: F401  (HUB_*: re-exported)
from .safetensors_io import TensorEntry, read_header, write_safetensors
from .source import (
    ExpertsStoredApart,
    SourceCheckpoint,
    embedding_rows,
    load_pickle_weights,
    open_source,
    weights_mismatch,
)
from .staging import staging_folder

# files carried over from SRC unchanged (top level only); README.md is regenerated as the model card
CARRIED_PATTERNS = (
    "generation_config.json",
    "tokenizer*", "special_tokens_map.json", "added_tokens.json", "vocab.*", "merges.txt", "*.model",
    "*.tiktoken", "chat_template.*", "preprocessor_config.json", "processor_config.json",
    "LICENSE*", "LICENCE*", "license*", "NOTICE*", "USE_POLICY*", "COPYING*",
)


@dataclass
class ConvertOptions:
    """What `convert` writes and how it reads the source.

    Attributes:
        block_size, memory_segments, fam_length, fam_layers: C, M, F and which layers carry FAM
            (defaults: `FAMSettings()`, the paper's 1024, 3, 64, all layers).
        fam_init: "bos", "random", "text:TEXT" or "file:PATH" (see `hf_fam.checkpoint_io.fam_init`).
        fam_update: "sink" (the zero-shot start, default) or "paper" (see `FAMConfig`).
        seed: seed of the random fam_init.
        revision, token: Hub revision and token, for a Hub id.
        force: replace an existing OUT.
        allow_pickle: accept `pytorch_model*.bin` weights (read with `weights_only=True`).
        base_model, repo_id: model-card inputs (see `hf_fam.checkpoint_io.cards.CardInfo`).
        eval_results: evaluation-results JSON files for the card (see `hf_fam.checkpoint_io.cards.load_eval_results`).
        progress: show a progress bar.
        gguf_file: with a folder SRC, the GGUF file in it to convert (a .gguf SRC path needs none).
        dtype: for a GGUF source, the dtype its weights are dequantised to ("float32" when None); other
            sources keep their dtype and refuse this option.
    """

    block_size: int = DEFAULT_BLOCK_SIZE
    memory_segments: int = DEFAULT_MEMORY_SEGMENTS
    fam_length: int = DEFAULT_FAM_LENGTH
    fam_layers: str = DEFAULT_FAM_LAYERS
    fam_init: str = "bos"
    fam_update: str = ZERO_SHOT_FAM_UPDATE
    seed: int = 0
    revision: str | None = None
    token: str | None = None
    force: bool = False
    allow_pickle: bool = False
    base_model: str | None = None
    repo_id: str | None = None
    eval_results: list[str | Path] | str | Path | None = None
    progress: bool = True
    gguf_file: str | None = None
    dtype: str | None = None


@dataclass
class ConvertResult:
    """What `convert` wrote."""

    out: Path
    source: str
    weight_files: list[str]
    num_tensors: int
    total_bytes: int
    carried_files: list[str]
    dropped_tensors: list[str] = field(default_factory=list)


def convert(src: str | Path, out: str | Path, options: ConvertOptions | None = None) -> ConvertResult:
    """Write a FAM checkpoint at `out` from the base checkpoint `src`.

    Args:
        src: a local checkpoint folder or a Hub id.
        out: the folder to create (refused if it exists, unless `options.force`).
        options: settings, fam_init, Hub access, card inputs.

    Returns:
        ConvertResult: what was written.

    Raises:
        FileNotFoundError, FileExistsError, ValueError: one line naming the problem; nothing is left behind.

    Example:
    ```python
    >>> convert("tiny-llama", "tiny-llama-fam", ConvertOptions(block_size=64, memory_segments=1, fam_length=8))
    ```
    """
    from ..modeling.fam_settings import validate_fam_settings

    options = options or ConvertOptions()
    from ..modeling.fam_settings import validate_fam_update

    validate_fam_settings(options.block_size, options.memory_segments, options.fam_length, options.fam_layers)
    validate_fam_update(options.fam_update)
    spec = FamInitSpec.parse(options.fam_init, seed=options.seed)
    out = Path(out).expanduser().absolute()
    if out.exists() and not options.force:
        raise FileExistsError(f"{out} already exists; pass --force to replace it")
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"{out} exists and is not a folder; remove it first")
    gguf_path = locate_gguf(src, options.gguf_file)
    if gguf_path is None:
        if options.dtype is not None:
            raise ValueError("--dtype applies to a GGUF source (the dtype it is dequantised to); a safetensors "
                             "checkpoint keeps its own dtype")
        folder, hub_id = resolve_source(src, options.revision, options.token, options.allow_pickle)
        _refuse_overlap(folder, out)
        return _convert_folder(folder, hub_id, out, options, spec)
    from ..runtime.loading import resolve_dtype

    dtype = resolve_dtype(options.dtype or "float32")
    if dtype == "auto":
        raise ValueError("--dtype auto has no meaning for a GGUF source; pick float32, bfloat16 or float16")
    check_gguf(gguf_path)  # unreadable file, unknown or unsupported architecture: nothing written yet
    with gguf_as_checkpoint(gguf_path, dtype) as folder:
        return _convert_folder(folder, None, out, options, spec, label=str(gguf_path))


def _convert_folder(folder: Path, hub_id: str | None, out: Path, options: ConvertOptions,
                    spec: FamInitSpec, label: str | None = None) -> ConvertResult:
    try:
        source = open_source(folder, hub_id, options.allow_pickle)
    except ExpertsStoredApart:
        return _convert_loaded(folder, hub_id, out, options, spec, label)

    base = source.base_config
    std = float(getattr(base, "initializer_range", 0.02))
    fam_init = build_fam_init(
        spec, fam_length=options.fam_length, hidden_size=base.hidden_size, dtype=source.embedding_dtype, std=std,
        tokenizer_folder=folder, embedding_rows=lambda ids: embedding_rows(source, ids),
        bos_token_id=sink_token_id(base),
    )
    with staging_folder(out, options.force) as tmp:
        weight_files, num_tensors, total_bytes = _write_weights(source, fam_init, tmp, options.progress)
        _write_config(source, options, tmp)
        carried = _carry_files(folder, tmp)
        for path in remote_code_files():
            shutil.copyfile(path, tmp / path.name)
        _write_card(folder, hub_id, options, spec, std, tmp, out.name)
    return ConvertResult(out, label or hub_id or str(folder), weight_files, num_tensors, total_bytes, carried,
                         source.dropped)


def _convert_loaded(folder: Path, hub_id: str | None, out: Path, options: ConvertOptions, spec: FamInitSpec,
                    label: str | None) -> ConvertResult:
    """A mixture of experts stored one expert per tensor: transformers loads it (fusing the experts into the
    model's tensors), `hf_fam.patch` puts it in FAM mode and `save_pretrained` writes it. The same output as the
    streamed conversion, but the whole model is held in memory once."""
    from transformers import AutoModelForCausalLM

    from ..runtime.patching import patch

    try:
        model, loading = AutoModelForCausalLM.from_pretrained(str(folder), dtype="auto", output_loading_info=True)
    except Exception as err:  # e.g. an expert's tensor missing: transformers cannot fuse the experts
        raise ValueError(f"transformers could not load {folder}: {' '.join(str(err).split())[:300]}") from None
    problems = [f"missing tensor {name}" for name in loading.get("missing_keys", [])] + [
        f"tensor {mismatch[0]} has another shape" for mismatch in loading.get("mismatched_keys", [])]
    if problems:  # transformers only warns, and starts the missing weights at random
        raise weights_mismatch(folder, problems)
    base = model.config
    std = float(getattr(base, "initializer_range", 0.02))
    embed = model.get_input_embeddings().weight.detach()
    fam_init = build_fam_init(
        spec, fam_length=options.fam_length, hidden_size=base.hidden_size, dtype=embed.dtype, std=std,
        tokenizer_folder=folder, embedding_rows=lambda ids: embed[ids].clone(), bos_token_id=sink_token_id(base),
    )
    base._name_or_path = hub_id or folder.name  # no local path leaks into the published config
    patch(model, block_size=options.block_size, memory_segments=options.memory_segments,
          fam_length=options.fam_length, fam_layers=options.fam_layers, fam_init=fam_init,
          fam_update=options.fam_update)
    with staging_folder(out, options.force) as tmp:
        model.save_pretrained(tmp)
        carried = _carry_files(folder, tmp)
        _write_card(folder, hub_id, options, spec, std, tmp, out.name)
        weight_files = sorted(path.name for path in tmp.glob("*.safetensors"))
        infos = [info for name in weight_files for info in read_header(tmp / name)[0].values()]
    return ConvertResult(out, label or hub_id or str(folder), weight_files, len(infos),
                         sum(info.nbytes for info in infos), carried, [])


def _refuse_overlap(src: Path, out: Path) -> None:
    src, target = src.resolve(), out.resolve()
    if src == target or src in target.parents or target in src.parents:
        raise ValueError(f"OUT {out} overlaps SRC {src}; write the FAM checkpoint to another folder")


def _output_name(name: str) -> str:
    # pytorch_model-00001-of-00002.bin -> model-00001-of-00002.safetensors
    return re.sub(r"^pytorch_model", "model", name).removesuffix(".bin") + ".safetensors"


def _write_weights(source: SourceCheckpoint, fam_init: torch.Tensor, tmp: Path, progress: bool):
    """Copy the kept tensors shard by shard, `fam.fam_init` appended to the last shard; write the index."""
    from tqdm.auto import tqdm

    expected = source.expected.tensors
    files = source.weights.files
    weight_map, total_bytes, total_params = {}, 0, 0
    planned = sum(_numel(shape) * dtype.itemsize for name, (shape, dtype) in source.shapes.items() if name in expected)
    bar = tqdm(total=planned + fam_init.numel() * fam_init.element_size(), unit="B", unit_scale=True,
               desc="Writing FAM weights", disable=not progress)
    written = []
    with bar:
        for i, path in enumerate(files):
            if source.safetensors is not None:
                infos = [info for info in source.safetensors.values() if info.path == path and info.name in expected]
                entries = [TensorEntry.from_file(info) for info in infos]
            else:
                state = load_pickle_weights(path)
                entries = [TensorEntry.from_tensor(name, t) for name, t in state.items() if name in expected]
            if i == len(files) - 1:
                entries.append(TensorEntry.from_tensor(FAM_INIT_KEY, fam_init))
            if not entries:
                continue
            name = _output_name(path.name) if source.weights.kind == "pickle" else path.name
            bar.set_postfix_str(name)
            write_safetensors(tmp / name, entries, {"format": "pt"}, progress=bar.update)
            if source.safetensors is None:
                del state  # release this shard's memory map before the next
            written.append(name)
            for entry in entries:
                weight_map[entry.name] = name
                total_bytes += entry.nbytes
                total_params += _numel(entry.shape)
    if source.weights.sharded:
        index = {"metadata": {"total_parameters": total_params, "total_size": total_bytes},
                 "weight_map": dict(sorted(weight_map.items()))}
        (tmp / SAFE_INDEX_NAME).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    elif len(written) != 1:  # pragma: no cover - a single source file always gives one output file
        raise RuntimeError(f"expected one weight file, wrote {written}")
    return written, len(weight_map), total_bytes


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def _write_config(source: SourceCheckpoint, options: ConvertOptions, tmp: Path) -> None:
    """config.json as `FAMForCausalLM.save_pretrained` writes it; generation_config.json if SRC has none."""
    from transformers import GenerationConfig

    from ..modeling.configuration_fam import FAMConfig

    config = FAMConfig(base_config=source.base_config, block_size=options.block_size,
                       memory_segments=options.memory_segments, fam_length=options.fam_length,
                       fam_layers=options.fam_layers, fam_update=options.fam_update)
    config.architectures = ["FAMForCausalLM"]
    config.auto_map = dict(AUTO_MAP)
    config.dtype = str(source.embedding_dtype).removeprefix("torch.")
    config.to_json_file(str(tmp / CONFIG_NAME), use_diff=True)
    if not (source.folder / "generation_config.json").is_file():
        generation = GenerationConfig.from_model_config(source.base_config)
        generation.save_pretrained(str(tmp))


def _carry_files(folder: Path, tmp: Path) -> list[str]:
    carried = []
    for path in sorted(folder.iterdir()):
        if path.is_file() and any(fnmatch(path.name, pattern) for pattern in CARRIED_PATTERNS):
            shutil.copyfile(path, tmp / path.name)  # contents only: a read-only Hub cache file stays writable here
            carried.append(path.name)
    return carried


def _write_card(folder: Path, hub_id: str | None, options: ConvertOptions, spec: FamInitSpec, std: float, tmp: Path,
                name: str) -> None:
    from huggingface_hub import metadata_load

    from .cards import CardInfo, load_eval_results, write_model_card

    readme = folder / "README.md"
    meta = (metadata_load(readme) or {}) if readme.is_file() else {}
    info = CardInfo(
        base_model=options.base_model or hub_id,
        license=meta.get("license"),
        license_name=meta.get("license_name"),
        license_link=meta.get("license_link"),
        language=meta.get("language"),
        fam_init=spec.describe(std),
        repo_id=options.repo_id or name,  # tmp's own name is not the checkpoint's
        eval_results=[r for path in _as_list(options.eval_results) for r in load_eval_results(path)],
    )
    write_model_card(tmp, info)


def _as_list(value) -> list:
    if value is None:
        return []
    return list(value) if isinstance(value, (list, tuple)) else [value]
