"""Look inside a FAM checkpoint folder without loading the model: `hf-fam inspect` and `hf-fam verify`.

`inspect_checkpoint` summarises what a FAM checkpoint is (base architecture, C/M/F, attention window,
parameters, the constant cache a stream needs per layer, whether its remote code is the installed hf_fam's).
`verify_checkpoint` lists every way the folder differs from what the installed hf_fam would write: code
files that are not byte-identical, tensors missing, of another shape or dtype, or unexpected. Both read
only config.json, the code files and the safetensors headers.

Example:
```python
>>> print(format_report(inspect_checkpoint("llama-fam")))
>>> verify_checkpoint("llama-fam")
[]
```
"""

from __future__ import annotations

import copy
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from ..modeling.configuration_fam import HEAD_AUTO_CLASSES, HEADS, LABEL_FIELDS
from ..modeling.fam_settings import FAMSettings
from .checkpoint import (
    AUTO_MAP,
    FAM_INIT_KEY,
    ExpectedTensor,
    code_transformers_range,
    compare_remote_code,
    compare_tensors,
    expected_tensors,
    find_weight_files,
    read_config,
    read_safetensors_tensors,
    remote_code_age,
)

REFRESH_COMMAND = "hf-fam verify --refresh-code"


@dataclass
class FAMSummary:
    """What a FAM config implies, computed from config.json alone.

    Attributes:
        model_type, architecture: the base family ("llama") and class ("LlamaForCausalLM").
        head: "causal LM", or "sequence classifier (N labels)" / "token classifier (N labels)" for a classifier;
            auto_class the transformers Auto class that loads it ("AutoModelForCausalLM", ...).
        num_layers, hidden_size, num_heads, num_kv_heads, head_dim: the base shape.
        block_size, memory_segments, fam_length, fam_layers: C, M, F and which layers carry FAM.
        attention_window: C·(M+1), tokens a block token attends to directly (plus F FAM tokens).
        dtype: the weights' dtype; dtype_bytes its size.
        cache_tokens: K/V entries per layer of a stream's cache: M blocks, the partial block, the FAM.
        kv_cache_bytes_per_layer: bytes per layer and sequence of those K/V entries plus the FAM state
            (F × hidden); constant however long the stream.
    """

    model_type: str
    head: str
    auto_class: str
    architecture: str
    num_layers: int
    hidden_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    block_size: int
    memory_segments: int
    fam_length: int
    fam_layers: str
    attention_window: int
    dtype: str
    dtype_bytes: int
    cache_tokens: int
    kv_cache_bytes_per_layer: int


def fam_summary(config: dict) -> FAMSummary:
    """Summarise a FAM config.json dict (see FAMSummary).

    Raises:
        ValueError: not a FAM config.
    """
    if config.get("model_type") != "fam" or not isinstance(config.get("base_config"), dict):
        raise ValueError(
            f"not a FAM checkpoint (model_type {config.get('model_type')!r}); convert it first with `hf-fam convert`"
        )
    base = config["base_config"]
    defaults = FAMSettings()
    settings = FAMSettings(*(config.get(k, getattr(defaults, k)) for k in ("block_size", "memory_segments",
                                                                             "fam_length", "fam_layers")))
    C, M, F = settings.block_size, settings.memory_segments, settings.fam_length
    hidden, heads = base["hidden_size"], base["num_attention_heads"]
    kv_heads = base.get("num_key_value_heads") or heads
    head_dim = base.get("head_dim") or hidden // heads
    dtype = config.get("dtype") or base.get("dtype") or base.get("torch_dtype") or "float32"
    dtype_bytes = getattr(torch, dtype, torch.float32).itemsize
    cache_tokens = settings.cache_tokens
    kv_bytes = 2 * cache_tokens * kv_heads * head_dim * dtype_bytes + F * hidden * dtype_bytes
    return FAMSummary(
        model_type=base["model_type"],
        head=_head(config),
        auto_class=_auto_class(config),
        architecture=(base.get("architectures") or ["?"])[0],
        num_layers=base["num_hidden_layers"],
        hidden_size=hidden,
        num_heads=heads,
        num_kv_heads=kv_heads,
        head_dim=head_dim,
        block_size=C,
        memory_segments=M,
        fam_length=F,
        fam_layers=settings.fam_layers,
        attention_window=settings.attention_window,
        dtype=dtype,
        dtype_bytes=dtype_bytes,
        cache_tokens=cache_tokens,
        kv_cache_bytes_per_layer=kv_bytes,
    )


def _auto_class(config: dict) -> str:
    heads = [HEAD_AUTO_CLASSES[name] for name in config.get("architectures") or [] if name in HEAD_AUTO_CLASSES]
    return heads[0] if heads else "AutoModelForCausalLM"


def _head(config: dict) -> str:
    auto_class = _auto_class(config)
    kind = HEADS[auto_class][1]
    if auto_class == "AutoModelForCausalLM":
        return kind
    labels = len(config.get("id2label") or {0: 0, 1: 1})  # transformers' default: two labels
    return f"{kind} ({labels} label{'' if labels == 1 else 's'})"


@dataclass
class InspectReport:
    """`inspect_checkpoint`'s result: the summary, parameter counts, weight files and code status."""

    path: str
    summary: FAMSummary
    parameters: int
    fam_parameters: int
    weight_files: list[str]
    weight_bytes: int
    code: dict[str, str]

    @property
    def code_matches(self) -> bool:
        return all(status == "identical" for status in self.code.values())

    def to_dict(self) -> dict:
        out = asdict(self)
        out["code_matches"] = self.code_matches
        return out


def inspect_checkpoint(folder: str | Path) -> InspectReport:
    """Summarise a FAM checkpoint folder (config.json, safetensors headers, code files).

    Args:
        folder: a local FAM checkpoint folder.

    Returns:
        InspectReport.

    Raises:
        FileNotFoundError / ValueError: not a folder, no config.json, not a FAM checkpoint, unreadable weights.

    Example:
    ```python
    >>> report = inspect_checkpoint("llama-fam")
    >>> report.summary.attention_window, report.code_matches
    (4096, True)
    ```
    """
    folder = _local_folder(folder)
    config = read_config(folder)
    summary = fam_summary(config)
    weights = find_weight_files(folder)
    if weights.kind != "safetensors":
        raise ValueError(f"{folder} holds pickle weights; FAM checkpoints are written as safetensors")
    tensors = read_safetensors_tensors(weights)
    fam = tensors.get(FAM_INIT_KEY)
    return InspectReport(
        path=str(folder),
        summary=summary,
        parameters=sum(info.numel for info in tensors.values()),
        fam_parameters=fam.numel if fam is not None else 0,
        weight_files=[p.name for p in weights.files],
        weight_bytes=sum(p.stat().st_size for p in weights.files),
        code=compare_remote_code(folder),
    )


def format_report(report: InspectReport) -> str:
    """The human-readable form `hf-fam inspect` prints."""
    import hf_fam

    s = report.summary
    rows = [
        ("base architecture", f"{s.model_type} ({s.architecture}): {s.num_layers} layers, hidden {s.hidden_size}, "
                              f"{s.num_heads} heads / {s.num_kv_heads} KV heads of {s.head_dim}"),
        ("head", s.head),
        ("FAM settings", f"block_size C={s.block_size}, memory_segments M={s.memory_segments}, "
                         f"fam_length F={s.fam_length}, fam_layers={s.fam_layers}"),
        ("attention window", f"{s.attention_window:,} tokens (C·(M+1)) + {s.fam_length} FAM tokens per layer"),
        ("parameters", f"{report.parameters:,} ({report.parameters - report.fam_parameters:,} base + "
                       f"{report.fam_parameters:,} fam_init), {s.dtype}"),
        ("weights", f"{format_bytes(report.weight_bytes)} in {len(report.weight_files)} file(s)"),
        ("KV cache per layer", f"{format_bytes(s.kv_cache_bytes_per_layer)} per sequence, constant: K/V of "
                               f"{s.cache_tokens:,} tokens ((M+1)·C + F) + the FAM state (F × hidden); "
                               f"{format_bytes(s.kv_cache_bytes_per_layer * s.num_layers)} for all "
                               f"{s.num_layers} layers"),
    ]
    if report.code_matches:
        code = f"identical to the installed hf_fam {hf_fam.__version__} ({len(report.code)} files)"
    else:
        differing = [f"{name} {status}" for name, status in report.code.items() if status != "identical"]
        code = f"DIFFERS from the installed hf_fam {hf_fam.__version__}: {', '.join(differing)}"
        age = code_age_problem(report.path)
        if age:
            code += f"; {age.removeprefix('code: ')}"
    rows.append(("remote code", code))
    width = max(len(k) for k, _ in rows)
    return "\n".join([f"FAM checkpoint {report.path}"] + [f"  {k:<{width}}  {v}" for k, v in rows])


def verify_checkpoint(folder: str | Path) -> list[str]:
    """Every difference between a FAM checkpoint folder and what the installed hf_fam writes.

    Checks config.json (a FAMConfig with the right auto_map), that each remote-code file is byte-identical
    to the installed hf_fam's, and that every weight the config implies is present with its shape and
    dtype (and nothing else is). The model is not loaded.

    Args:
        folder: a local FAM checkpoint folder.

    Returns:
        One line per problem; empty when the checkpoint verifies.

    Raises:
        FileNotFoundError / ValueError: not a folder, no config.json, not a FAM checkpoint.

    Example:
    ```python
    >>> verify_checkpoint("llama-fam")
    ['code: modeling_fam.py differs from the installed hf_fam 0.1.0']
    ```
    """
    import hf_fam
    from hf_fam import FAMConfig

    folder = _local_folder(folder)
    raw = read_config(folder)
    fam_summary(raw)  # refuses a non-FAM config
    problems = []
    if raw.get("auto_map") != AUTO_MAP:
        problems.append(f"config: auto_map is {raw.get('auto_map')!r}, expected {AUTO_MAP!r}")
    heads = [name for name in raw.get("architectures") or [] if name in HEAD_AUTO_CLASSES]
    if not heads:
        problems.append(f"config: architectures is {raw.get('architectures')!r}, expected one of "
                        f"{sorted(HEAD_AUTO_CLASSES)}")
    for name, status in compare_remote_code(folder).items():
        if status != "identical":
            problems.append(f"code: {name} {status} (installed hf_fam {hf_fam.__version__})")
    age_line = code_age_problem(folder)
    if age_line:
        problems.append(age_line)

    try:
        config = FAMConfig.from_pretrained(str(folder))
    except Exception as err:  # a config FAMConfig refuses: report, and stop before the weights
        return problems + [f"config: cannot be loaded as a FAMConfig ({' '.join(str(err).split())[:200]})"]
    try:
        weights = find_weight_files(folder)
        if weights.kind != "safetensors":
            return problems + [f"weights: {weights.files[0].name} is pickle; FAM checkpoints are safetensors"]
        found = read_safetensors_tensors(weights)
    except (FileNotFoundError, ValueError) as err:
        return problems + [f"weights: {err}"]
    dtype = _torch_dtype(getattr(config, "dtype", None)) or _torch_dtype(getattr(config.base_config, "dtype", None))
    base_config = copy.deepcopy(config.base_config)
    for name in LABEL_FIELDS:  # a classifier's score layer has the FAM config's labels
        setattr(base_config, name, getattr(config, name))
    expected = expected_tensors(base_config, dtype=dtype, auto_class=_auto_class(raw)).tensors
    expected[FAM_INIT_KEY] = ExpectedTensor((config.fam_length, config.base_config.hidden_size), dtype or torch.float32)
    problems += [f"weights: {p}" for p in compare_tensors(found, expected, check_dtype=True)]
    if weights.index_metadata.get("total_size") not in (None, sum(info.nbytes for info in found.values())):
        problems.append("weights: the index's total_size does not match the shards")
    return problems


def code_age_problem(folder: str | Path) -> str | None:
    """One line when the checkpoint's remote code was written by an older (or newer) hf_fam, with the fix."""
    import hf_fam
    from hf_fam.modeling.fam_compat import SUPPORTED_TRANSFORMERS

    age = remote_code_age(folder)
    if age not in ("older", "newer"):
        return None
    theirs = code_transformers_range(folder)
    their_text = f"transformers {_range_text(theirs)}" if theirs else "only the transformers release it was written for"
    ours = f"the installed hf_fam {hf_fam.__version__}'s supports transformers {_range_text(SUPPORTED_TRANSFORMERS)}"
    if age == "older":
        return (f"code: older than the installed hf_fam's (it supports {their_text}; {ours}); refresh it without "
                f"touching the weights: {REFRESH_COMMAND} {folder}")
    return (f"code: newer than the installed hf_fam's (it supports {their_text}; {ours}); upgrade hf_fam "
            "(pip install -U hf-fam) before verifying it")


def _range_text(bounds: tuple[str, str]) -> str:
    return f"{bounds[0]} to {bounds[1]}"


def _local_folder(folder: str | Path) -> Path:
    path = Path(folder).expanduser()
    if not path.is_dir():
        raise FileNotFoundError(
            f"{folder} is not a local folder; download a Hub checkpoint first (`hf download REPO --local-dir DIR`)"
        )
    return path


def _torch_dtype(value) -> torch.dtype | None:
    if isinstance(value, torch.dtype):
        return value
    if isinstance(value, str) and isinstance(getattr(torch, value, None), torch.dtype):
        return getattr(torch, value)
    return None


def format_bytes(n: int) -> str:
    """1536 -> "1.5 KiB"."""
    if n < 1024:
        return f"{n} B"
    exp = min(int(math.log(n, 1024)), 4)
    return f"{n / 1024**exp:.1f} {'BKMGT'[exp]}iB".replace("BiB", "B")
