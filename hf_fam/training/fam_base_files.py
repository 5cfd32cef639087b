"""The base a quantized run's adapter applies to, written from the source's files: `write_fam_base`.

A run that converts its model on the fly, or puts a FAM checkpoint in the training start, saves the FAM
checkpoint its adapter applies to as OUT/fam_base (hf_fam/training/training_base.py). The model in memory is
that checkpoint, so a run in full precision saves it with `save_pretrained`. A run on quantized weights
(`--quantize`) cannot: its layers hold 4- or 8-bit approximations. The adapter of a QLoRA run applies to the
unquantized weights, so fam_base is written from the files the run loaded instead, tensor by tensor and never
whole in memory: a base checkpoint through `hf-fam convert`'s writer, a FAM checkpoint copied, with the run's
training start (its `fam_init` and `fam_update`) in place of the checkpoint's. Every other tensor is the source's,
byte for byte (tested).
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

from ..checkpoint_io.checkpoint import CONFIG_NAME, FAM_INIT_KEY, find_weight_files
from ..checkpoint_io.safetensors_io import TensorEntry, read_header, write_safetensors
from .lora import unwrap_fam_model


def write_fam_base(source: str, folder: Path, model, *, base_checkpoint: bool) -> Path:
    """Write at `folder` (which must not exist) the unquantized FAM checkpoint `model` was loaded from, in the
    training start `model` now holds.

    Args:
        source: the folder or Hub id the run loaded.
        folder: where to write it.
        model: the (quantized) FAM model, in its training start, not PEFT-wrapped.
        base_checkpoint: True when `source` is a base checkpoint the run converted on the fly, False for a FAM
            checkpoint.

    Returns:
        The folder.
    """
    from ..checkpoint_io.hub import resolve_source

    fam_model = unwrap_fam_model(model)
    settings, config = fam_model.fam_settings, fam_model.config
    fam_init = fam_model.fam.fam_init.detach().cpu()
    fam_update = getattr(config, "fam_update", "paper")
    if base_checkpoint:
        from safetensors.torch import save_file

        from ..checkpoint_io.convert import ConvertOptions, convert

        with tempfile.TemporaryDirectory() as tmp:
            start = Path(tmp) / "fam_init.safetensors"
            save_file({FAM_INIT_KEY: fam_init.contiguous()}, str(start))
            convert(source, folder, ConvertOptions(
                block_size=settings.block_size, memory_segments=settings.memory_segments,
                fam_length=settings.fam_length, fam_layers=settings.fam_layers, fam_init=f"file:{start}",
                fam_update=fam_update, progress=False,
            ))
        return folder
    src, _ = resolve_source(source)
    _copy_with_start(src, folder, fam_init, fam_update)
    return folder


def _copy_with_start(src: Path, folder: Path, fam_init, fam_update: str) -> None:
    """Copy the FAM checkpoint `src` to `folder` with `fam_init` (stored in the checkpoint's dtype) and
    `fam_update` in place of its own."""
    weights = find_weight_files(src)
    if weights.kind != "safetensors":
        raise ValueError(f"{src} keeps its weights as {weights.kind} files; a quantized run writes its base from "
                         "safetensors: save the checkpoint again with save_pretrained, or drop --quantize")
    if weights.index is not None:
        holder = src / weights.index[FAM_INIT_KEY] if FAM_INIT_KEY in weights.index else None
    else:
        holder = weights.files[0] if FAM_INIT_KEY in read_header(weights.files[0])[0] else None  # None: F = 0
    folder.mkdir(parents=True)
    for path in sorted(src.iterdir()):
        if path.name == CONFIG_NAME:
            config = json.loads(path.read_text())
            config["fam_update"] = fam_update
            (folder / CONFIG_NAME).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        elif path == holder:
            tensors, metadata = read_header(path)
            dtype = tensors[FAM_INIT_KEY].torch_dtype
            entries = [TensorEntry.from_tensor(name, fam_init.to(dtype)) if name == FAM_INIT_KEY
                       else TensorEntry.from_file(info) for name, info in tensors.items()]
            write_safetensors(folder / path.name, entries, metadata or {"format": "pt"})
        elif path.is_file():
            shutil.copyfile(path, folder / path.name)


__all__ = ["write_fam_base"]
