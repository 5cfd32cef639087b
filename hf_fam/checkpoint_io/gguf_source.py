"""A GGUF file as the source of `hf-fam convert`: dequantised into a plain safetensors checkpoint first.

GGUF (llama.cpp's format) is how many small models are distributed, often quantised. transformers reads it
with the `gguf` package and dequantises every tensor; the model it builds carries a gguf
`quantization_config` that `save_pretrained` refuses. Here the dequantised weights are moved into a plain
model of the same architecture (same config without `quantization_config`), cast to the requested dtype,
and saved with the tokenizer (also read from the GGUF file) into a temporary folder; the ordinary conversion
then reads that folder. Unlike a safetensors source, this loads the whole model into memory once.

Everything that can be checked from the file's header is checked first, without reading the tensors: the
file is a readable GGUF file, transformers can read its architecture, and hf_fam supports that family.

Example:
```python
>>> with gguf_as_checkpoint(Path("SmolLM2-135M-Instruct.Q4_1.gguf"), torch.float32) as folder:
...     convert(folder, "smollm2-fam")
```
"""

from __future__ import annotations

import contextlib
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import torch

GGUF_SUFFIX = ".gguf"


def locate_gguf(src: str | Path, gguf_file: str | None) -> Path | None:
    """The GGUF file SRC names (a .gguf path, or a folder plus `gguf_file`), or None for another source.

    Raises:
        FileNotFoundError: the file named does not exist.
        ValueError: `gguf_file` given with a SRC that is not a folder.
    """
    path = Path(src).expanduser()
    if gguf_file is not None:
        if not path.is_dir():
            raise ValueError(f"--gguf-file names a file inside a folder; SRC {src} is not a folder")
        path = path / gguf_file
    elif path.suffix.lower() != GGUF_SUFFIX:
        return None
    if not path.is_file():
        raise FileNotFoundError(f"GGUF file {path} does not exist")
    return path


def check_gguf(path: Path) -> str:
    """Read the header of a GGUF file (no tensors) and return its transformers model_type.

    Raises:
        ValueError: one line: not a readable GGUF file (truncated, corrupt), an architecture transformers
            cannot read, or a family hf_fam does not support.
    """
    _require_gguf_package()
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    from ..modeling.fam_adapters import get_adapter

    try:
        parsed = load_gguf_checkpoint(str(path), return_tensors=False)
    except ValueError as err:
        message = " ".join(str(err).split())
        if "architecture" in message and "not supported" in message:
            arch = _architecture(path)
            raise ValueError(f"{path.name}: GGUF architecture {arch!r} cannot be read by transformers, so hf_fam "
                             "cannot convert it") from None
        raise ValueError(f"{path.name} is not a readable GGUF file (truncated or corrupt?): {message[:200]}") from None
    except Exception as err:  # gguf raises many kinds on a damaged file (struct, numpy, index errors)
        raise ValueError(f"{path.name} is not a readable GGUF file (truncated or corrupt?): "
                         f"{type(err).__name__}: {' '.join(str(err).split())[:200]}") from None
    model_type = parsed["config"].get("model_type")
    try:
        get_adapter(model_type)
    except ValueError as err:
        raise ValueError(f"{path.name} holds a {model_type!r} model: {err}") from None
    _check_tensor_data(path)
    return model_type


def _architecture(path: Path) -> str:
    from gguf import GGUFReader

    try:
        field = GGUFReader(str(path)).fields["general.architecture"]
        return bytes(field.parts[field.data[0]]).decode("utf-8", "replace")
    except Exception:
        return "unknown"


def _check_tensor_data(path: Path) -> None:
    """Every tensor's data lies inside the file (a truncated download fails here, before any writing)."""
    from gguf import GGUFReader

    try:
        reader = GGUFReader(str(path))
        size = path.stat().st_size
        for tensor in reader.tensors:
            if tensor.data_offset + tensor.n_bytes > size:
                raise ValueError(f"tensor {tensor.name} ends past the end of the file")
    except Exception as err:
        raise ValueError(f"{path.name} is not a readable GGUF file (truncated or corrupt?): "
                         f"{' '.join(str(err).split())[:200]}") from None


def _require_gguf_package() -> None:
    try:
        import gguf  # noqa: F401
    except ImportError:
        raise ValueError("reading a GGUF file needs the gguf package: pip install gguf") from None


def dequantise(path: Path, dtype: torch.dtype, folder: Path) -> Path:
    """Write the GGUF model at `path` as a plain safetensors checkpoint (weights in `dtype`) with its
    tokenizer into `folder`; return `folder`."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf_dir, name = str(path.parent), path.name
    loaded = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=name, dtype=dtype)
    settings = loaded.config.to_dict()
    settings.pop("quantization_config", None)
    config = type(loaded.config)(**settings)
    config.dtype = dtype
    with torch.device("meta"):
        plain = type(loaded)(config)
    missing, unexpected = plain.load_state_dict(loaded.state_dict(), strict=False, assign=True)
    tied = getattr(plain, "_tied_weights_keys", None) or {}
    missing = [k for k in missing if k not in tied and not k.endswith("lm_head.weight")]
    if missing or unexpected:  # pragma: no cover - transformers builds both from the same config
        raise ValueError(f"{name}: the dequantised weights do not fit a plain {type(loaded).__name__} "
                         f"(missing {missing[:3]}, unexpected {unexpected[:3]})")
    plain.tie_weights()
    plain.generation_config = loaded.generation_config
    del loaded
    plain.save_pretrained(str(folder))
    tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=name)
    tokenizer.save_pretrained(str(folder))
    card = card_metadata(path)
    if card:  # what a Hub checkpoint's README says: the converted model's card carries it on
        from huggingface_hub import metadata_save

        metadata_save(folder / "README.md", card)
    return folder


# GGUF's general.* keys that say what a model card's metadata says, by the card's key
CARD_FIELDS = {"license": "general.license", "license_name": "general.license.name",
               "license_link": "general.license.link", "language": "general.languages"}


def card_metadata(path: Path) -> dict:
    """The license and languages a GGUF file records (general.license, .license.name, .license.link,
    general.languages), as model-card metadata; {} when it records none."""
    from gguf import GGUFReader

    fields = GGUFReader(str(path)).fields
    found = {}
    for key, gguf_key in CARD_FIELDS.items():
        if gguf_key in fields:
            value = fields[gguf_key].contents()
            if value not in (None, "", []):
                found[key] = value
    return found


@contextlib.contextmanager
def gguf_as_checkpoint(path: Path, dtype: torch.dtype, workdir: Path | None = None) -> Iterator[Path]:
    """A temporary plain checkpoint folder (in `workdir`, default the system's temporary folder) made from the
    GGUF file; removed afterwards, whatever happens."""
    tmp = Path(tempfile.mkdtemp(prefix="hf-fam-gguf-source.", dir=workdir))
    try:
        folder = tmp / path.stem  # the folder's name becomes the base model's name in the config
        folder.mkdir()
        yield dequantise(path, dtype, folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
