"""Benchmarks at real model shapes (`hf-fam bench --preset NAME`): does FAM cost what BSWA costs?

The small-model suite (`hf_fam.apps.bench`) measures launch overhead more than compute. Here the models have
the shapes of real checkpoints (random weights; speed does not depend on them), at the paper's C=1024, M=3,
F=64:

- `smollm2-135m-cpu`: SmolLM2-135M (Llama; hidden 576, 30 layers, 9 heads / 3 KV heads, MLP 1536, vocabulary
  49152), fp32 on the CPU: the regression benchmark every change to the chain or block attention must keep.
- `llama-3.2-1b-gpu`: Llama-3.2-1B (hidden 2048, 16 layers, 32 heads / 8 KV heads, MLP 8192, vocabulary
  128256), bf16 on CUDA.

Parts, for full attention (the unmodified model, sdpa), BSWA (F = 0) and FAM, same weights:
- **prefill**: N tokens at each batch size, FAM and BSWA in chunks of `chunk` tokens through their cache (at
  least 8 blocks per chunk) and in one forward; full attention in one forward, up to `full_max_length`.
- **train**: one training step (forward + backward, non-reentrant gradient checkpointing) with LoRA of rank
  `lora_rank` on the family's projections, FAM vs BSWA, at each of `train_lengths`; the loss summed
  `loss_chunk` tokens at a time (`fam_loss_chunk`), so the head keeps no (tokens x vocabulary) logits.
- **decode**: ms per generated token after each context length.

Every figure is the median over `rounds` interleaved rounds (variants run in turn within a round, after one
warm-up); ratios are taken within a round, then their median. `attention_flops` gives the expected full/BSWA
ratio from the FLOP count, which the measured ratio is checked against.
"""

from __future__ import annotations

import json
import statistics
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from ..modeling.fam_settings import DEFAULT_LOSS_CHUNK_TOKENS
from .bench import interleaved, machine_info, median_ratio, output_path, output_stem, proc_status_mib, time_decode

PAPER_SETTINGS = dict(block_size=1024, memory_segments=3, fam_length=64)
SHAPES = {
    "smollm2-135m": dict(hidden=576, layers=30, heads=9, kv_heads=3, intermediate=1536, vocab=49152),
    "llama-3.2-1b": dict(hidden=2048, layers=16, heads=32, kv_heads=8, intermediate=8192, vocab=128256),
}


@dataclass
class RealBenchConfig:
    """One preset: a model shape, its device and dtype, and what to measure."""

    shape: str
    dtype: str
    device: str
    block_size: int = PAPER_SETTINGS["block_size"]
    memory_segments: int = PAPER_SETTINGS["memory_segments"]
    fam_length: int = PAPER_SETTINGS["fam_length"]
    prefill_lengths: list[int] = field(default_factory=lambda: [8192, 16384, 32768, 65536])
    batches: list[int] = field(default_factory=lambda: [1, 8])
    batch_max_tokens: int = 65536  # batch x length above this is skipped (memory, time)
    chunk: int = 8192  # FAM/BSWA prefill through the cache in chunks of this many tokens (>= 8 blocks)
    one_forward: bool = True  # also FAM/BSWA in one forward
    full_max_length: int = 65536
    train_lengths: list[int] = field(default_factory=lambda: [8192, 16384, 32768, 65536])
    lora_rank: int = 64
    # the LoRA step's loss summed this many tokens at a time (`fam_loss_chunk`): no (tokens x vocabulary) logits,
    # which at 64k tokens and SmolLM2's 49k vocabulary would need ~40 GB with their backward
    loss_chunk: int = DEFAULT_LOSS_CHUNK_TOKENS
    decode_contexts: list[int] = field(default_factory=lambda: [1024, 8192, 65536])
    decode_steps: int = 32
    rounds: int = 3
    # on the CPU, longer prefills warm up on this many tokens (nothing is captured or tuned per size there, and a
    # full-length warm-up of full attention at 64k would take as long as a timed round)
    cpu_warmup_tokens: int = 16384
    threads: int = 2
    parts: list[str] = field(default_factory=lambda: ["prefill", "train", "decode"])
    # the FAM chain's graph steps compiled with torch.compile (`fam_compile.COMPILE_STEPS`; CUDA inference only)
    compile_chain: bool = False

    def __post_init__(self):
        if self.shape not in SHAPES:
            raise ValueError(f"unknown shape {self.shape!r}; one of {', '.join(SHAPES)}")
        for name in ("cpu_warmup_tokens", "loss_chunk"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.chunk < 8 * self.block_size:
            raise ValueError(f"chunk must hold at least 8 blocks ({8 * self.block_size} tokens), got {self.chunk}")


PRESETS = {
    "smollm2-135m-cpu": RealBenchConfig(shape="smollm2-135m", dtype="float32", device="cpu", batches=[1, 8],
                                        batch_max_tokens=65536, train_lengths=[8192, 16384, 32768, 65536]),
    "llama-3.2-1b-gpu": RealBenchConfig(shape="llama-3.2-1b", dtype="bfloat16", device="cuda",
                                        decode_contexts=[1024, 8192, 65536], batch_max_tokens=8 * 65536),
}


def preset(name: str, **overrides) -> RealBenchConfig:
    """A preset, with any field replaced (e.g. `prefill_lengths=[8192]` for a quick run)."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; one of {', '.join(PRESETS)}")
    return replace(PRESETS[name], **{k: v for k, v in overrides.items() if v is not None})


# ----------------------------------------------------------------------------------------------------------
# the FLOP model
# ----------------------------------------------------------------------------------------------------------
def attention_flops(config: RealBenchConfig, n: int) -> dict:
    """Forward FLOPs of reading n tokens: the same dense part (projections, MLP) for all variants, and the
    attention over the keys each query sees: causal for full attention; for BSWA, its own block causally
    plus the min(t, M) complete blocks before block t. Returns the totals and the expected full/BSWA ratio."""
    s = SHAPES[config.shape]
    head_dim = s["hidden"] // s["heads"]
    per_layer = 2 * (s["hidden"] * head_dim * (2 * s["heads"] + 2 * s["kv_heads"])
                     + 3 * s["hidden"] * s["intermediate"])
    dense = n * s["layers"] * per_layer
    per_key = s["layers"] * 4 * s["heads"] * head_dim  # QK^T and AV
    C, M = config.block_size, config.memory_segments
    full_keys = n * (n + 1) // 2
    bswa_keys = 0
    for t in range(-(-n // C)):
        q = min(C, n - t * C)
        bswa_keys += q * min(t, M) * C + q * (q + 1) // 2
    full, bswa = dense + per_key * full_keys, dense + per_key * bswa_keys
    return {"dense": dense, "full": full, "bswa": bswa, "full_over_bswa": full / bswa}


# ----------------------------------------------------------------------------------------------------------
# models
# ----------------------------------------------------------------------------------------------------------
def shape_model(shape: str, device, max_positions: int, **overrides):
    """A random-weight Llama of a shape in SHAPES (fp32, sdpa, tied embeddings), initialised on `device` (a 1B
    model's random init is slow on a CPU); `overrides` replace LlamaConfig fields (e.g. fewer layers)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    s = SHAPES[shape]
    fields = dict(hidden_size=s["hidden"], intermediate_size=s["intermediate"], num_hidden_layers=s["layers"],
                  num_attention_heads=s["heads"], num_key_value_heads=s["kv_heads"], vocab_size=s["vocab"],
                  max_position_embeddings=max_positions, tie_word_embeddings=True, attn_implementation="sdpa")
    with torch.device(device):
        return LlamaForCausalLM(LlamaConfig(**{**fields, **overrides})).eval()


def build(variant: str, config: RealBenchConfig):
    """The unmodified model ("full"), or FAM with F = 0 ("bswa") or F > 0 ("fam") around the same weights."""
    import torch

    from ..modeling.modeling_fam import FAMForCausalLM

    torch.manual_seed(0)
    longest = max(config.prefill_lengths + config.train_lengths + config.decode_contexts) + config.decode_steps + 1
    base = shape_model(config.shape, config.device, longest).to(dtype=getattr(torch, config.dtype))
    if variant == "full":
        return base
    return FAMForCausalLM.from_base_model(
        base, block_size=config.block_size, memory_segments=config.memory_segments,
        fam_length=config.fam_length if variant == "fam" else 0,
    ).eval()


def _ids(config: RealBenchConfig, batch: int, n: int):
    import torch

    gen = torch.Generator().manual_seed(n + batch)
    return torch.randint(3, SHAPES[config.shape]["vocab"], (batch, n), generator=gen).to(config.device)


def read(model, ids, chunk: int):
    """Read ids (B, n) in one forward (chunk 0) or in chunks through the cache; only the last logits are made."""
    import torch

    from ..modeling.fam_compat import CACHE_KWARG, output_cache

    with torch.inference_mode():
        if chunk <= 0:
            model(ids, use_cache=False, logits_to_keep=1)
            return None
        cache = None
        for s in range(0, ids.shape[1], chunk):
            cache = output_cache(model(ids[:, s : s + chunk], **{CACHE_KWARG: cache}, use_cache=True, logits_to_keep=1))
        return cache


# ----------------------------------------------------------------------------------------------------------
# the parts
# ----------------------------------------------------------------------------------------------------------
def _warmup_ids(config: RealBenchConfig, ids):
    """The first `cpu_warmup_tokens` of `ids` to warm up on, or None: warm up on `ids` itself (CUDA, or short)."""
    if config.device.startswith("cuda") or ids.shape[1] <= config.cpu_warmup_tokens:
        return None
    return ids[:, : config.cpu_warmup_tokens]


def _prefill_fns(config: RealBenchConfig, models: dict, ids) -> dict:
    """The timed reads of `ids`: full attention (within `full_max_length`), BSWA and FAM in chunks and in one
    forward."""
    fns = {}
    if ids.shape[1] <= config.full_max_length:
        fns["full"] = lambda: read(models["full"], ids, 0)
    for v in ("bswa", "fam"):
        fns[f"{v}_chunked"] = lambda v=v: read(models[v], ids, config.chunk)
        if config.one_forward:
            fns[f"{v}_one"] = lambda v=v: read(models[v], ids, 0)
    return fns


def print_row(row: dict) -> None:
    print(json.dumps(row), flush=True)


def _interleaved(fns: dict, config: RealBenchConfig, warmup: dict | None):
    """`interleaved`, or the error's first line where the device ran out of memory (the row records it and the
    run goes on with the next size: one size too large for the card must not cost the sizes after it)."""
    import torch

    try:
        return interleaved(fns, config.rounds, config.device, warmup=warmup)
    except torch.OutOfMemoryError as e:
        torch.cuda.empty_cache()
        return f"out of memory: {str(e).splitlines()[0]}"


def bench_prefill(config: RealBenchConfig, models: dict, emit=print_row) -> None:
    for batch in config.batches:
        for n in config.prefill_lengths:
            if batch * n > config.batch_max_tokens:
                continue
            ids = _ids(config, batch, n)
            short = _warmup_ids(config, ids)
            warm = None if short is None else _prefill_fns(config, models, short)
            times = _interleaved(_prefill_fns(config, models, ids), config, warm)
            if isinstance(times, str):
                emit({"batch": batch, "n": n, "error": times})
                continue
            row = {"batch": batch, "n": n, **{f"{k}_s": statistics.median(t) for k, t in times.items()},
                   "fam_over_bswa": median_ratio(times["fam_chunked"], times["bswa_chunked"])}
            if config.one_forward:
                row["fam_over_bswa_one_forward"] = median_ratio(times["fam_one"], times["bswa_one"])
            if "full" in times:
                bswa = times["bswa_one"] if config.one_forward else times["bswa_chunked"]
                row["full_over_bswa"] = median_ratio(times["full"], bswa)
                row["full_over_fam"] = median_ratio(times["full"], times["fam_chunked"])
                row["flops_full_over_bswa"] = attention_flops(config, n)["full_over_bswa"]
            emit(row)


def lora_model(variant: str, config: RealBenchConfig):
    """FAM or BSWA with LoRA (rank `lora_rank`) on the family's projections, gradient checkpointing on."""
    from peft import get_peft_model

    from ..training.finetune import enable_checkpointing
    from ..training.lora import fam_lora_config

    model = build(variant, config)
    enable_checkpointing(model)
    peft_model = get_peft_model(model, fam_lora_config(model, r=config.lora_rank))
    return peft_model.train()


def bench_train(config: RealBenchConfig, emit=print_row) -> None:
    models = {v: lora_model(v, config) for v in ("bswa", "fam")}
    for n in config.train_lengths:
        ids = _ids(config, 1, n)

        def step(model, ids):
            model.zero_grad(set_to_none=True)
            model(input_ids=ids, labels=ids, use_cache=False, fam_loss_chunk=config.loss_chunk).loss.backward()

        short = _warmup_ids(config, ids)
        warm = None if short is None else {v: (lambda m=m: step(m, short)) for v, m in models.items()}
        times = _interleaved({v: (lambda m=m: step(m, ids)) for v, m in models.items()}, config, warm)
        if isinstance(times, str):
            emit({"n": n, "lora_rank": config.lora_rank, "error": times})
            continue
        row = {"n": n, "lora_rank": config.lora_rank, **{f"{v}_s": statistics.median(t) for v, t in times.items()},
               "fam_over_bswa": median_ratio(times["fam"], times["bswa"])}
        emit(row)


def bench_decode(config: RealBenchConfig, models: dict, emit=print_row) -> None:
    import torch

    from ..modeling.fam_compat import output_cache

    caches = {}
    for v in ("full", "bswa", "fam"):
        for n in config.decode_contexts:
            ids = _ids(config, 1, n)
            if v != "full":
                caches[(v, n)] = read(models[v], ids, config.chunk)
            elif n <= config.full_max_length:
                with torch.inference_mode():
                    caches[(v, n)] = output_cache(models[v](ids, use_cache=True, logits_to_keep=1))
    times = time_decode(models, caches, config.decode_steps, config.rounds, config.device)
    shortest = min(config.decode_contexts)
    for (v, n), t in times.items():
        row = {"variant": v, "context": n, "ms_per_token": 1e3 * statistics.median(t) / config.decode_steps,
               "vs_shortest": median_ratio(t, times[(v, shortest)])}
        emit(row)


def run(config: RealBenchConfig, out: str | Path, log=print) -> dict:
    """Measure the selected parts in the order given; write `out`.json and `out`.md after each row measured (a run
    stopped part-way, say by a time limit, keeps what it measured) and `out`_prefill.png after each part (with
    matplotlib)."""

    import torch

    from ..modeling import fam_compile
    from .bench_real_report import check_targets, format_markdown

    torch.set_num_threads(config.threads)
    cuda = config.device.startswith("cuda")
    result = {"benchmark": f"hf_fam at the {config.shape} shape", "config": asdict(config),
              "machine": machine_info(config), "part_seconds": {}}
    out = output_stem(out)
    out.parent.mkdir(parents=True, exist_ok=True)

    def save():
        result["targets"] = check_targets(result, config)
        # the whole run's peak so far, every part
        peak = torch.cuda.max_memory_allocated(config.device) / 2**20 if cuda else proc_status_mib("VmHWM")
        if peak is not None:
            result["machine"]["peak_gpu_mib" if cuda else "peak_rss_mib"] = round(peak)
        for suffix, text in ((".json", json.dumps(result, indent=2)), (".md", format_markdown(result))):
            tmp = output_path(out, suffix + ".tmp")
            tmp.write_text(text)
            tmp.replace(output_path(out, suffix))

    def emit(part: str):
        def add(row: dict) -> None:  # each row is saved as it is measured
            result[part].append(row)
            log(json.dumps(row))
            save()
        return add

    compiling = fam_compile.COMPILE_STEPS
    fam_compile.COMPILE_STEPS = config.compile_chain
    try:
        _run_parts(config, result, out, save, emit, log)
    finally:
        fam_compile.COMPILE_STEPS = compiling
    log(format_markdown(result))
    return result


def _run_parts(config: RealBenchConfig, result: dict, out: Path, save, emit, log) -> None:
    import time

    from .bench_real_report import plot

    start = time.perf_counter()
    models = {v: build(v, config) for v in ("full", "bswa", "fam")} if {"prefill", "decode"} & set(config.parts) else {}
    result["part_seconds"]["build"] = round(time.perf_counter() - start, 1)
    for part in config.parts:
        start = time.perf_counter()
        log(f"== {part}")
        result[part] = []
        if part == "train":
            bench_train(config, emit(part))
        else:
            globals()[f"bench_{part}"](config, models, emit(part))
        result["part_seconds"][part] = round(time.perf_counter() - start, 1)
        save()
        plot(result, out)
    if not config.parts:
        save()
