"""safetensors files read and written as byte streams: tensors are copied without being loaded.

A FAM checkpoint holds the base checkpoint's tensors unchanged, so conversion never needs them as tensors:
`read_header` gives every tensor's name, dtype, shape and byte range, and `write_safetensors` writes a new
file whose data is streamed from those byte ranges in small chunks. Peak memory stays at one chunk, however
large the shard (`safetensors.torch.save_file` would hold the whole shard as tensors *and* as serialised
bytes). The format is the documented one (https://github.com/huggingface/safetensors#format): an 8-byte
little-endian header length, a JSON header, then the raw little-endian tensor data; every file written
here is re-opened with `safetensors.safe_open` before it is trusted.

Example:
```python
>>> tensors, metadata = read_header("model.safetensors")
>>> entries = [TensorEntry.from_file(info) for info in tensors.values()]
>>> entries.append(TensorEntry.from_tensor("fam.fam_init", torch.zeros(8, 64)))
>>> write_safetensors("out/model.safetensors", entries, metadata)
```
"""

from __future__ import annotations

import json
import math
import os
import struct
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

# safetensors dtype names and their element sizes in bytes
DTYPE_SIZES = {
    "F64": 8, "F32": 4, "F16": 2, "BF16": 2, "F8_E4M3": 1, "F8_E5M2": 1,
    "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U64": 8, "U32": 4, "U16": 2, "U8": 1, "BOOL": 1,
}
TORCH_TO_SAFETENSORS = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.float8_e4m3fn: "F8_E4M3", torch.float8_e5m2: "F8_E5M2",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
    torch.bool: "BOOL",
}
SAFETENSORS_TO_TORCH = {name: dtype for dtype, name in TORCH_TO_SAFETENSORS.items()}

CHUNK_BYTES = 8 * 1024 * 1024  # copy buffer: the only weight bytes ever held in memory
_MAX_HEADER_BYTES = 100 * 1024 * 1024  # safetensors' own limit


@dataclass(frozen=True)
class TensorInfo:
    """One tensor of a safetensors file, as its header describes it.

    `begin` and `end` are absolute byte offsets in `path`.
    """

    name: str
    dtype: str
    shape: tuple[int, ...]
    path: Path
    begin: int
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.begin

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def torch_dtype(self) -> torch.dtype | None:
        return SAFETENSORS_TO_TORCH.get(self.dtype)


def read_header(path: str | Path) -> tuple[dict[str, TensorInfo], dict[str, str]]:
    """Parse a safetensors file's header without reading its data.

    The file is first opened with `safetensors.safe_open`, which checks that the header is valid and that
    the data section covers the file exactly (a truncated or padded file fails there).

    Args:
        path: the .safetensors file.

    Returns:
        (tensors by name in file order, the `__metadata__` dict).

    Raises:
        FileNotFoundError: no such file.
        ValueError: the file is not a valid safetensors file (one line naming the file and the reason).

    Example:
    ```python
    >>> tensors, metadata = read_header("model.safetensors")
    >>> tensors["model.embed_tokens.weight"].shape
    (32000, 4096)
    ```
    """
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    try:
        with safe_open(str(path), framework="pt"):
            pass
    except SafetensorError as err:
        raise ValueError(f"{path.name} is corrupt or truncated ({_one_line(err)}); re-download or re-save it") from None
    with open(path, "rb") as f:
        (header_len,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(header_len))
    data_start = 8 + header_len
    metadata = header.pop("__metadata__", None) or {}
    tensors = {}
    for name, entry in sorted(header.items(), key=lambda item: item[1]["data_offsets"][0]):
        begin, end = entry["data_offsets"]
        tensors[name] = TensorInfo(
            name, entry["dtype"], tuple(entry["shape"]), path, data_start + begin, data_start + end
        )
    return tensors, metadata


@dataclass
class TensorEntry:
    """One tensor to write: its bytes come from a byte range of a file, or from an in-memory buffer."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    nbytes: int
    path: Path | None = None
    offset: int = 0
    buffer: memoryview | None = None

    @classmethod
    def from_file(cls, info: TensorInfo, name: str | None = None) -> TensorEntry:
        """Copy the tensor `info` describes, byte for byte (optionally under another name)."""
        return cls(name or info.name, info.dtype, info.shape, info.nbytes, path=info.path, offset=info.begin)

    @classmethod
    def from_tensor(cls, name: str, tensor: torch.Tensor) -> TensorEntry:
        """Write a CPU tensor's bytes (a view of its storage when contiguous; no copy)."""
        if tensor.dtype not in TORCH_TO_SAFETENSORS:
            raise ValueError(f"{name}: dtype {tensor.dtype} cannot be stored in safetensors")
        tensor = tensor.detach().cpu().contiguous()
        raw = tensor.reshape(-1).view(torch.uint8).numpy()  # (numel * itemsize,) bytes of the storage
        return cls(name, TORCH_TO_SAFETENSORS[tensor.dtype], tuple(tensor.shape), raw.nbytes, buffer=memoryview(raw))


def write_safetensors(
    path: str | Path,
    entries: list[TensorEntry],
    metadata: dict[str, str] | None = None,
    progress: Callable[[int], None] | None = None,
) -> None:
    """Write `entries` as one safetensors file, streaming each tensor's bytes in `CHUNK_BYTES` pieces.

    Args:
        path: the file to create.
        entries: tensors in the order their data is laid out.
        metadata: the header's `__metadata__` (string values), e.g. {"format": "pt"}.
        progress: called with the number of bytes written after each chunk.

    Returns:
        None. The written file is checked with `read_header` (safetensors' own validation).

    Example:
    ```python
    >>> write_safetensors("x.safetensors", [TensorEntry.from_tensor("w", torch.ones(2, 2))], {"format": "pt"})
    ```
    """
    header: dict[str, dict] = {}
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    offset = 0
    for entry in entries:
        if entry.name in header:
            raise ValueError(f"tensor {entry.name!r} written twice")
        expected = math.prod(entry.shape) * DTYPE_SIZES.get(entry.dtype, 0)
        if entry.dtype in DTYPE_SIZES and expected != entry.nbytes:
            raise ValueError(f"tensor {entry.name!r}: {entry.nbytes} bytes for shape {entry.shape} of {entry.dtype}")
        header[entry.name] = {
            "dtype": entry.dtype, "shape": list(entry.shape), "data_offsets": [offset, offset + entry.nbytes]
        }
        offset += entry.nbytes
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # the data section starts 8-byte aligned, as safetensors writes it
    if len(blob) > _MAX_HEADER_BYTES:
        raise ValueError(f"{Path(path).name}: header of {len(blob)} bytes is over safetensors' limit")

    buffer = bytearray(CHUNK_BYTES)
    view = memoryview(buffer)
    with open(path, "wb") as out:
        out.write(struct.pack("<Q", len(blob)))
        out.write(blob)
        source, source_path = None, None
        try:
            for entry in entries:
                if entry.buffer is not None:
                    out.write(entry.buffer)
                    if progress:
                        progress(entry.nbytes)
                    continue
                if entry.path != source_path:
                    if source is not None:
                        source.close()
                    source, source_path = open(entry.path, "rb"), entry.path
                source.seek(entry.offset)
                remaining = entry.nbytes
                while remaining:
                    n = source.readinto(view[: min(remaining, CHUNK_BYTES)])
                    if not n:
                        raise ValueError(f"{entry.path.name} ended inside tensor {entry.name!r}: the file is truncated")
                    out.write(view[:n])
                    remaining -= n
                    if progress:
                        progress(n)
        finally:
            if source is not None:
                source.close()
        out.flush()
        os.fsync(out.fileno())
    read_header(path)


def _one_line(err: BaseException) -> str:
    return " ".join(str(err).split())
