"""The benchmark suite (`hf-fam bench`, `python benchmarks/run.py`): is FAM worth using?

On a small Llama (hidden 512, 8 layers, fp32 by default) it measures, for full attention (sdpa, the
unmodified model), block sliding window attention (BSWA: F = 0) and FAM at the same C and M:

- **prefill**: time and peak memory to read N tokens (1k ... 64k). FAM and BSWA read the input in chunks
  through their constant-size cache (memory flat in N); full attention reads it in one forward.
- **train**: one training step (forward + backward) of FAM vs BSWA.
- **decode**: milliseconds per generated token after 1k ... 64k tokens of context.
- **stream**: peak memory while FAM reads a 1M-token stream.

Timings: a warm-up, then several rounds in which the variants run interleaved; ratios are taken within a
round and their median reported (this machine is noisy). Peak memory: on CUDA `max_memory_allocated`; on
the CPU the peak RSS of a fresh process per measurement (a process's RSS never shrinks back).
Results: JSON, a markdown table and PNG plots.
"""

from __future__ import annotations

import copy
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .bench_report import check_targets, format_markdown, plot

VARIANTS = ("full", "bswa", "fam")


@dataclass
class BenchConfig:
    """What to measure, on which model."""

    hidden: int = 512
    layers: int = 8
    heads: int = 8
    vocab: int = 32000
    block_size: int = 256
    memory_segments: int = 1
    fam_length: int = 16
    dtype: str = "float32"
    device: str = "cpu"
    threads: int = 2
    prefill_lengths: list[int] = field(default_factory=lambda: [1024, 4096, 16384, 32768, 65536])
    full_max_length: int = 32768
    chunk: int = 4096
    train_length: int = 4096
    train_batch: int = 1
    decode_contexts: list[int] = field(default_factory=lambda: [1024, 4096, 16384, 65536])
    decode_steps: int = 64
    stream_tokens: int = 1_048_576
    rounds: int = 3
    parts: list[str] = field(default_factory=lambda: ["prefill", "train", "decode", "stream"])
    cuda_graphs: bool = True  # FAM chain from CUDA graphs (CUDA inference only; see fam_graphs)


# ----------------------------------------------------------------------------------------------------------
# models and timing
# ----------------------------------------------------------------------------------------------------------
def build(variant: str, config: BenchConfig):
    """The unmodified model ("full") or its FAM wrapper with F = 0 ("bswa") or F > 0 ("fam"); same weights."""
    import torch

    from ..modeling.modeling_fam import FAMForCausalLM
    from ..tiny import tiny_model

    base = tiny_model(
        "llama", 0, attn="sdpa", hidden_size=config.hidden, intermediate_size=4 * config.hidden,
        num_hidden_layers=config.layers, num_attention_heads=config.heads, num_key_value_heads=config.heads,
        vocab_size=config.vocab,
        max_position_embeddings=max(config.prefill_lengths + config.decode_contexts + [config.stream_tokens]) + 1,
    ).to(device=config.device, dtype=getattr(torch, config.dtype)).eval()
    if variant == "full":
        return base
    fam_length = config.fam_length if variant == "fam" else 0
    return FAMForCausalLM.from_base_model(
        base, block_size=config.block_size, memory_segments=config.memory_segments, fam_length=fam_length
    ).eval()


def _sync(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


def read(model, n: int, config: BenchConfig, chunked: bool):
    """Read n random tokens; return the cache (chunked) or None. Only the last token's logits are made.

    `config.chunk == 0` reads everything in one forward, also for FAM and BSWA.
    """
    import torch

    from ..modeling.fam_compat import CACHE_KWARG, output_cache

    gen = torch.Generator().manual_seed(n)
    ids = torch.randint(0, config.vocab, (1, n), generator=gen).to(config.device)
    fam_kwargs = {"fam_cuda_graphs": config.cuda_graphs} if hasattr(model, "fam_settings") else {}
    with torch.inference_mode():
        if not chunked or config.chunk <= 0:
            model(ids, use_cache=False, logits_to_keep=1, **fam_kwargs)
            return None
        cache = None
        for s in range(0, n, config.chunk):
            cache = output_cache(model(ids[:, s : s + config.chunk], **{CACHE_KWARG: cache}, use_cache=True,
                                       logits_to_keep=1, **fam_kwargs))
        return cache


def timed(fn, device: str) -> float:
    _sync(device)
    t0 = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - t0


def interleaved(fns: dict, rounds: int, device: str, warmup: dict | None = None) -> dict[str, list[float]]:
    """Warm each function up (or run `warmup`'s functions instead, e.g. the same work on fewer tokens), then time
    all of them in turn, `rounds` times. On CUDA the warm-up runs twice: the FAM chain keeps its CUDA graphs
    across forwards and captures a step on its first long chunk or the second time it comes (`fam_graphs`),
    so the second pass is the first in the steady state."""
    for _ in range(2 if device.startswith("cuda") else 1):
        for fn in (warmup or fns).values():
            fn()
    times = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            times[name].append(timed(fn, device))
    return times


def time_decode(models: dict, caches: dict, steps: int, rounds: int, device: str) -> dict[tuple, list[float]]:
    """Seconds to decode `steps` tokens one at a time from each cache (`caches[(variant, context)]`, copied for
    every run so that each starts from the same context), interleaved over `rounds`."""
    import torch

    from ..modeling.fam_compat import CACHE_KWARG, output_cache

    token = torch.tensor([[7]], device=device)

    def decode(v, n):
        cache = copy.deepcopy(caches[(v, n)])
        with torch.inference_mode():
            for _ in range(steps):
                cache = output_cache(models[v](token, **{CACHE_KWARG: cache}, use_cache=True))

    return interleaved({key: (lambda key=key: decode(*key)) for key in caches}, rounds, device)


def output_stem(out: str | Path) -> Path:
    """The results' path stem: `--out` as given, less a .json or .md it ends with. Dots elsewhere in the name stay
    (`llama-3.2-1b-gpu` writes llama-3.2-1b-gpu.json, not llama-3.json)."""
    out = Path(out)
    return out.with_suffix("") if out.suffix in (".json", ".md") else out


def output_path(stem: Path, suffix: str) -> Path:
    """`stem` with `suffix` appended (Path.with_suffix would replace the part after a dot in the name)."""
    return stem.parent / f"{stem.name}{suffix}"


def median_ratio(a: list[float], b: list[float]) -> float:
    return statistics.median(x / y for x, y in zip(a, b))


# ----------------------------------------------------------------------------------------------------------
# peak memory
# ----------------------------------------------------------------------------------------------------------
def peak_memory_mib(variant: str, n: int, config: BenchConfig) -> float:
    """Peak memory of reading n tokens: CUDA allocator peak, or the peak RSS of a fresh process (CPU)."""
    import torch

    if config.device.startswith("cuda"):
        model = _models(config)[variant]
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        read(model, n, config, chunked=variant != "full")
        _sync(config.device)
        return (torch.cuda.max_memory_allocated() - base) / 2**20
    cmd = [sys.executable, "-m", "hf_fam.apps.bench", "--child-memory", variant, str(n), json.dumps(asdict(config))]
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(out.stderr.strip().splitlines()[-1] if out.stderr.strip() else "child failed")
    return float(out.stdout.strip().splitlines()[-1])


def _child_memory(variant: str, n: int, config: BenchConfig) -> None:
    """In a fresh process: the peak RSS (MiB) reached while reading n tokens, imports and model included."""
    import resource

    import torch

    torch.set_num_threads(config.threads)
    model = build(variant, config)
    read(model, n, config, chunked=variant != "full")
    peak = proc_status_mib("VmHWM")
    print(peak if peak is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)


def proc_status_mib(field: str) -> float | None:
    """A memory field of /proc/self/status in MiB (Linux; None elsewhere). `VmHWM` is the peak RSS of this
    program's own address space: `ru_maxrss` also counts the address space replaced by exec, i.e. the parent's
    RSS at the time of the fork, so a fresh child would report at least its parent's peak."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


_MODEL_CACHE: dict = {}


def _models(config: BenchConfig) -> dict:
    key = json.dumps(asdict(config), sort_keys=True)
    if key not in _MODEL_CACHE:
        _MODEL_CACHE.clear()
        _MODEL_CACHE[key] = {v: build(v, config) for v in VARIANTS}
    return _MODEL_CACHE[key]


# ----------------------------------------------------------------------------------------------------------
# the parts
# ----------------------------------------------------------------------------------------------------------
def bench_prefill(config: BenchConfig, log=print) -> list[dict]:
    models = _models(config)
    rows = []
    for n in config.prefill_lengths:
        variants = [v for v in VARIANTS if v != "full" or n <= config.full_max_length]
        fns = {v: (lambda v=v: read(models[v], n, config, chunked=v != "full")) for v in variants}
        times = interleaved(fns, config.rounds, config.device)
        row = {"n": n, **{f"{v}_s": statistics.median(times[v]) for v in variants},
               "fam_over_bswa": median_ratio(times["fam"], times["bswa"])}
        if "full" in times:
            row["full_over_fam"] = median_ratio(times["full"], times["fam"])
        for v in variants:
            row[f"{v}_peak_mib"] = peak_memory_mib(v, n, config)
        row["fam_over_bswa_memory"] = row["fam_peak_mib"] / row["bswa_peak_mib"]
        rows.append(row)
        log(json.dumps(row))
    return rows


def bench_train(config: BenchConfig, log=print) -> dict:
    import torch

    models = {v: build(v, config).train() for v in ("bswa", "fam")}
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, config.vocab, (config.train_batch, config.train_length), generator=gen).to(config.device)

    def step(model):
        model.zero_grad(set_to_none=True)
        model(ids, labels=ids, use_cache=False).loss.backward()

    times = interleaved({v: (lambda m=m: step(m)) for v, m in models.items()}, config.rounds, config.device)
    row = {"tokens": config.train_length * config.train_batch,
           **{f"{v}_s": statistics.median(t) for v, t in times.items()},
           "fam_over_bswa": median_ratio(times["fam"], times["bswa"])}
    log(json.dumps(row))
    return row


def bench_decode(config: BenchConfig, log=print) -> list[dict]:
    """ms/token after each context length: FAM (and BSWA) continue a constant-size cache; full attention a
    DynamicCache that grows (only up to `full_max_length`)."""
    models = _models(config)
    caches = {}
    for v in VARIANTS:
        for n in config.decode_contexts:
            if v == "full" and n > config.full_max_length:
                continue
            caches[(v, n)] = read(models[v], n, config, chunked=True)
    times = time_decode(models, caches, config.decode_steps, config.rounds, config.device)
    rows = []
    shortest = min(config.decode_contexts)
    for v in VARIANTS:
        for n in config.decode_contexts:
            if (v, n) not in times:
                continue
            row = {"variant": v, "context": n,
                   "ms_per_token": 1e3 * statistics.median(times[(v, n)]) / config.decode_steps,
                   f"ratio_vs_{shortest}": median_ratio(times[(v, n)], times[(v, shortest)])}
            rows.append(row)
            log(json.dumps(row))
    return rows


def bench_stream(config: BenchConfig, log=print) -> dict:
    """Peak memory while FAM reads `stream_tokens` tokens, against reading 32k (fresh processes)."""
    shorter = min(32768, config.stream_tokens)
    row = {"tokens": config.stream_tokens,
           "peak_mib": peak_memory_mib("fam", config.stream_tokens, config),
           f"peak_mib_at_{shorter}": peak_memory_mib("fam", shorter, config)}
    row["ratio"] = row["peak_mib"] / row[f"peak_mib_at_{shorter}"]
    log(json.dumps(row))
    return row


def run(config: BenchConfig, out: str | Path, log=print) -> dict:
    """Run the selected parts; write `out`.json, `out`.md and PNG plots next to it."""
    import torch

    torch.set_num_threads(config.threads)
    result = {"benchmark": "hf_fam suite", "config": asdict(config), "machine": machine_info(config)}
    for part in config.parts:
        log(f"== {part}")
        result[part] = globals()[f"bench_{part}"](config, log=log)
    result["targets"] = check_targets(result)
    out = output_stem(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    output_path(out, ".json").write_text(json.dumps(result, indent=2))
    output_path(out, ".md").write_text(format_markdown(result))
    plot(result, out)
    log(format_markdown(result))
    return result


def machine_info(config: BenchConfig) -> dict:
    import torch
    import transformers

    from ..runtime.cpu_memory import allocator_environment, in_effect

    info = {"platform": platform.platform(), "cpus": os.cpu_count(), "torch": torch.__version__,
            "transformers": transformers.__version__,
            "threads": config.threads, "device": config.device,
            "allocator": in_effect()}  # hf_fam.runtime.cpu_memory's setting: keep, huge_pages or system
    env = allocator_environment()
    if env:
        info["allocator_env"] = env
    if config.device.startswith("cuda"):
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


if __name__ == "__main__":
    if len(sys.argv) == 5 and sys.argv[1] == "--child-memory":
        _child_memory(sys.argv[2], int(sys.argv[3]), BenchConfig(**json.loads(sys.argv[4])))
