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
from .bench import interleaved, machine_info, median_ratio, proc_status_mib, time_decode

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
def build(variant: str, config: RealBenchConfig):
    """The unmodified model ("full"), or FAM with F = 0 ("bswa") or F > 0 ("fam") around the same weights."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from ..modeling.modeling_fam import FAMForCausalLM

    s = SHAPES[config.shape]
    torch.manual_seed(0)
    longest = max(config.prefill_lengths + config.train_lengths + config.decode_contexts) + config.decode_steps + 1
    base = LlamaForCausalLM(LlamaConfig(
        hidden_size=s["hidden"], intermediate_size=s["intermediate"], num_hidden_layers=s["layers"],
        num_attention_heads=s["heads"], num_key_value_heads=s["kv_heads"], vocab_size=s["vocab"],
        max_position_embeddings=longest, tie_word_embeddings=True, attn_implementation="sdpa",
    )).to(device=config.device, dtype=getattr(torch, config.dtype)).eval()
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

    with torch.inference_mode():
        if chunk <= 0:
            model(ids, use_cache=False, logits_to_keep=1)
            return None
        cache = None
        for s in range(0, ids.shape[1], chunk):
            cache = model(ids[:, s : s + chunk], cache=cache, use_cache=True, logits_to_keep=1).cache
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


def bench_prefill(config: RealBenchConfig, models: dict, log=print) -> list[dict]:
    rows = []
    for batch in config.batches:
        for n in config.prefill_lengths:
            if batch * n > config.batch_max_tokens:
                continue
            ids = _ids(config, batch, n)
            short = _warmup_ids(config, ids)
            warm = None if short is None else _prefill_fns(config, models, short)
            times = interleaved(_prefill_fns(config, models, ids), config.rounds, config.device, warmup=warm)
            row = {"batch": batch, "n": n, **{f"{k}_s": statistics.median(t) for k, t in times.items()},
                   "fam_over_bswa": median_ratio(times["fam_chunked"], times["bswa_chunked"])}
            if config.one_forward:
                row["fam_over_bswa_one_forward"] = median_ratio(times["fam_one"], times["bswa_one"])
            if "full" in times:
                bswa = times["bswa_one"] if config.one_forward else times["bswa_chunked"]
                row["full_over_bswa"] = median_ratio(times["full"], bswa)
                row["full_over_fam"] = median_ratio(times["full"], times["fam_chunked"])
                row["flops_full_over_bswa"] = attention_flops(config, n)["full_over_bswa"]
            rows.append(row)
            log(json.dumps(row))
    return rows


def lora_model(variant: str, config: RealBenchConfig):
    """FAM or BSWA with LoRA (rank `lora_rank`) on the family's projections, gradient checkpointing on."""
    from peft import get_peft_model

    from ..training.finetune import enable_checkpointing
    from ..training.lora import fam_lora_config

    model = build(variant, config)
    enable_checkpointing(model)
    peft_model = get_peft_model(model, fam_lora_config(model, r=config.lora_rank))
    return peft_model.train()


def bench_train(config: RealBenchConfig, log=print) -> list[dict]:
    models = {v: lora_model(v, config) for v in ("bswa", "fam")}
    rows = []
    for n in config.train_lengths:
        ids = _ids(config, 1, n)

        def step(model, ids):
            model.zero_grad(set_to_none=True)
            model(input_ids=ids, labels=ids, use_cache=False, fam_loss_chunk=config.loss_chunk).loss.backward()

        short = _warmup_ids(config, ids)
        warm = None if short is None else {v: (lambda m=m: step(m, short)) for v, m in models.items()}
        times = interleaved({v: (lambda m=m: step(m, ids)) for v, m in models.items()}, config.rounds, config.device,
                            warmup=warm)
        row = {"n": n, "lora_rank": config.lora_rank, **{f"{v}_s": statistics.median(t) for v, t in times.items()},
               "fam_over_bswa": median_ratio(times["fam"], times["bswa"])}
        rows.append(row)
        log(json.dumps(row))
    return rows


def bench_decode(config: RealBenchConfig, models: dict, log=print) -> list[dict]:
    import torch

    caches = {}
    for v in ("full", "bswa", "fam"):
        for n in config.decode_contexts:
            ids = _ids(config, 1, n)
            if v != "full":
                caches[(v, n)] = read(models[v], ids, config.chunk)
            elif n <= config.full_max_length:
                with torch.inference_mode():
                    caches[(v, n)] = models[v](ids, use_cache=True, logits_to_keep=1).cache
    times = time_decode(models, caches, config.decode_steps, config.rounds, config.device)
    rows, shortest = [], min(config.decode_contexts)
    for (v, n), t in times.items():
        row = {"variant": v, "context": n, "ms_per_token": 1e3 * statistics.median(t) / config.decode_steps,
               "vs_shortest": median_ratio(t, times[(v, shortest)])}
        rows.append(row)
        log(json.dumps(row))
    return rows


def run(config: RealBenchConfig, out: str | Path, log=print) -> dict:
    """Measure the selected parts; write `out`.json, `out`.md and `out`_prefill.png (with matplotlib)."""
    import torch

    torch.set_num_threads(config.threads)
    result = {"benchmark": f"hf_fam at the {config.shape} shape", "config": asdict(config),
              "machine": machine_info(config)}
    models = {v: build(v, config) for v in ("full", "bswa", "fam")} if {"prefill", "decode"} & set(config.parts) else {}
    for part in config.parts:
        log(f"== {part}")
        result[part] = bench_train(config, log) if part == "train" else globals()[f"bench_{part}"](config, models, log)
    result["targets"] = check_targets(result, config)
    peak = None if config.device.startswith("cuda") else proc_status_mib("VmHWM")
    if peak is not None:
        result["machine"]["peak_rss_mib"] = round(peak)  # the whole run's, every part
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=2))
    out.with_suffix(".md").write_text(format_markdown(result))
    plot(result, out)
    log(format_markdown(result))
    return result


# ----------------------------------------------------------------------------------------------------------
# targets and report
# ----------------------------------------------------------------------------------------------------------
def check_targets(result: dict, config: RealBenchConfig) -> dict:
    """The performance issue's targets for this device, each with the measured figure."""
    cpu = not config.device.startswith("cuda")
    t = {}
    for r in result.get("prefill", []):
        bound = 1.10 if cpu else (1.15 if r["batch"] == 1 else 1.08)
        t[f"prefill b={r['batch']} {r['n']}: FAM/BSWA <= {bound}"] = _target(r["fam_over_bswa"], bound)
        if cpu and "full_over_bswa" in r:
            expected = r["flops_full_over_bswa"]
            t[f"prefill b={r['batch']} {r['n']}: full/BSWA >= 0.9 x FLOP ratio {expected:.2f}"] = _target(
                r["full_over_bswa"], round(0.9 * expected, 3), above=True)
        if not cpu and r["n"] == 65536 and "full_over_fam" in r:
            t[f"prefill b={r['batch']} 64k: full/FAM >= 3"] = _target(r["full_over_fam"], 3.0, above=True)
    for r in result.get("train", []):
        bound = 1.20 if cpu else 1.35
        t[f"LoRA training step {r['n']}: FAM/BSWA <= {bound}"] = _target(r["fam_over_bswa"], bound)
    fam_decode = [r for r in result.get("decode", []) if r["variant"] == "fam"]
    if len(fam_decode) > 1:
        longest = max(fam_decode, key=lambda r: r["context"])
        t[f"decode {longest['context']} / shortest <= 1.1"] = _target(longest["vs_shortest"], 1.1)
    return t


def _target(value: float, bound: float, above: bool = False) -> dict:
    return {"value": round(value, 3), "bound": bound, "met": bool(value >= bound if above else value <= bound)}


def format_markdown(result: dict) -> str:
    cfg, machine = result["config"], result["machine"]
    s = SHAPES[cfg["shape"]]
    where = machine.get("gpu") or f"{machine['cpus']} CPUs, {cfg['threads']} threads"
    allocator = machine.get("allocator")
    if allocator is None and machine.get("freed_memory_kept") is not None:  # results written before the name
        allocator = "huge_pages" if machine.get("huge_pages") else "keep" if machine["freed_memory_kept"] else "system"
    where += {"huge_pages": ", huge pages", "keep": ", freed memory kept",
              "system": ", system malloc"}.get(allocator, "")
    where += "".join(f" {k}={v}" for k, v in machine.get("allocator_env", {}).items())
    if machine.get("peak_rss_mib"):
        where += f"; peak RSS {machine['peak_rss_mib'] / 1024:.1f} GiB"
    lines = [f"{cfg['shape']} shape (hidden {s['hidden']}, {s['layers']} layers, {s['heads']}/{s['kv_heads']} heads), "
             f"{cfg['dtype']}, {where}; C={cfg['block_size']}, M={cfg['memory_segments']}, F={cfg['fam_length']}; "
             f"medians of {cfg['rounds']} interleaved rounds", ""]
    if result.get("prefill"):
        lines += ["| batch | N | full s | BSWA s (chunks) | FAM s (chunks) | FAM/BSWA | BSWA s (one) | FAM s (one) "
                  "| FAM/BSWA (one) | full/BSWA | FLOP full/BSWA | full/FAM |",
                  "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for r in result["prefill"]:
            f = lambda k, d=2: f"{r[k]:.{d}f}" if k in r else "–"  # noqa: E731
            lines.append(f"| {r['batch']} | {r['n']} | {f('full_s')} | {f('bswa_chunked_s')} | {f('fam_chunked_s')} | "
                         f"{f('fam_over_bswa', 3)} | {f('bswa_one_s')} | {f('fam_one_s')} | "
                         f"{f('fam_over_bswa_one_forward', 3)} | {f('full_over_bswa')} | {f('flops_full_over_bswa')} | "
                         f"{f('full_over_fam')} |")
        lines.append("")
    if result.get("train"):
        lines += ["| LoRA step, N | rank | BSWA s | FAM s | FAM/BSWA |", "|---:|---:|---:|---:|---:|"]
        lines += [f"| {r['n']} | {r['lora_rank']} | {r['bswa_s']:.2f} | {r['fam_s']:.2f} | {r['fam_over_bswa']:.3f} |"
                  for r in result["train"]]
        lines.append("")
    if result.get("decode"):
        lines += ["| variant | context | ms/token | vs shortest |", "|---|---:|---:|---:|"]
        lines += [f"| {r['variant']} | {r['context']} | {r['ms_per_token']:.2f} | {r['vs_shortest']:.2f} |"
                  for r in result["decode"]]
        lines.append("")
    if result.get("targets"):
        lines += ["| target | measured | met |", "|---|---:|:---:|"]
        lines += [f"| {name} | {t['value']} | {'yes' if t['met'] else 'no'} |" for name, t in result["targets"].items()]
    return "\n".join(lines) + "\n"


def plot(result: dict, stem: Path) -> Path | None:
    """Prefill seconds against N for each variant and batch size (skipped without matplotlib)."""
    try:
        import matplotlib
    except ImportError:
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result.get("prefill") or []
    if not rows:
        return None
    batches = sorted({r["batch"] for r in rows})
    fig, axes = plt.subplots(1, len(batches), figsize=(5.5 * len(batches), 4), dpi=110, squeeze=False)
    series = (("full_s", "o-", "full attention"), ("bswa_chunked_s", "s--", "BSWA (chunks)"),
              ("fam_chunked_s", "^-", "FAM (chunks)"), ("bswa_one_s", "s:", "BSWA (one forward)"),
              ("fam_one_s", "^:", "FAM (one forward)"))
    for ax, batch in zip(axes[0], batches):
        for key, style, label in series:
            pts = [(r["n"], r[key]) for r in rows if r["batch"] == batch and key in r]
            if pts:
                ax.plot(*zip(*pts), style, label=label)
        ax.set(xscale="log", yscale="log", xlabel="tokens read", ylabel="prefill time (s)", title=f"batch {batch}")
        ax.set_xscale("log", base=2)
        ax.grid(alpha=0.3)
        ax.legend()
    machine = result["machine"].get("gpu") or f"{result['machine']['cpus']} CPUs"
    fig.suptitle(f"{result['config']['shape']} shape, {result['config']['dtype']}, {machine}")
    fig.tight_layout()
    path = stem.parent / f"{stem.name}_prefill.png"
    fig.savefig(path)
    plt.close(fig)
    return path
