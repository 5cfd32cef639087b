"""The real-shape benchmark's report (`hf_fam.apps.bench_real`): the performance issue's targets for the
device measured, the markdown table and the prefill plot."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from .bench_real import SHAPES

if TYPE_CHECKING:
    from .bench_real import RealBenchConfig


def check_targets(result: dict, config: RealBenchConfig) -> dict:
    """The performance issue's targets for this device, each with the measured figure."""
    cpu = not config.device.startswith("cuda")
    t = {}
    for r in result.get("prefill", []):
        bound = 1.10 if cpu else (1.15 if r["batch"] == 1 else 1.08)
        t[f"prefill b={r['batch']} {r['n']}: FAM/BSWA <= {bound}"] = _target(r.get("fam_over_bswa"), bound, r)
        if cpu and "full_over_bswa" in r:
            expected = r["flops_full_over_bswa"]
            t[f"prefill b={r['batch']} {r['n']}: full/BSWA >= 0.9 x FLOP ratio {expected:.2f}"] = _target(
                r["full_over_bswa"], round(0.9 * expected, 3), above=True)
        if not cpu and r["n"] == 65536 and "full_over_fam" in r:
            t[f"prefill b={r['batch']} 64k: full/FAM >= 3"] = _target(r["full_over_fam"], 3.0, above=True)
    for r in result.get("train", []):
        bound = 1.20 if cpu else 1.35
        t[f"LoRA training step {r['n']}: FAM/BSWA <= {bound}"] = _target(r.get("fam_over_bswa"), bound, r)
    fam_decode = [r for r in result.get("decode", []) if r["variant"] == "fam"]
    if len(fam_decode) > 1:
        longest = max(fam_decode, key=lambda r: r["context"])
        t[f"decode {longest['context']} / shortest <= 1.1"] = _target(longest["vs_shortest"], 1.1)
    return t


def _target(value: float | None, bound: float, row: dict | None = None, above: bool = False) -> dict:
    """A target's measured value against its bound; a row that could not be measured (`error`) misses it."""
    if row is not None and "error" in row:
        return {"value": None, "bound": bound, "met": False, "error": row["error"]}
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
    if machine.get("peak_gpu_mib"):
        where += f"; peak GPU memory {machine['peak_gpu_mib'] / 1024:.1f} GiB"
    if machine.get("torch"):
        where += f"; torch {machine['torch']}" + (f", transformers {machine['transformers']}"
                                                  if machine.get("transformers") else "")
    lines = [f"{cfg['shape']} shape (hidden {s['hidden']}, {s['layers']} layers, {s['heads']}/{s['kv_heads']} heads), "
             f"{cfg['dtype']}, {where}; C={cfg['block_size']}, M={cfg['memory_segments']}, F={cfg['fam_length']}; "
             f"medians of {cfg['rounds']} interleaved rounds"
             + ("; the chain's graph steps compiled (torch.compile)" if cfg.get("compile_chain") else ""), ""]
    if result.get("prefill"):
        lines += ["| batch | N | full s | BSWA s (chunks) | FAM s (chunks) | FAM/BSWA | BSWA s (one) | FAM s (one) "
                  "| FAM/BSWA (one) | full/BSWA | FLOP full/BSWA | full/FAM |",
                  "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for r in result["prefill"]:
            if "error" in r:
                lines.append(f"| {r['batch']} | {r['n']} | {r['error']} |" + " |" * 9)
                continue
            f = lambda k, d=2: f"{r[k]:.{d}f}" if k in r else "–"  # noqa: E731
            lines.append(f"| {r['batch']} | {r['n']} | {f('full_s')} | {f('bswa_chunked_s')} | {f('fam_chunked_s')} | "
                         f"{f('fam_over_bswa', 3)} | {f('bswa_one_s')} | {f('fam_one_s')} | "
                         f"{f('fam_over_bswa_one_forward', 3)} | {f('full_over_bswa')} | {f('flops_full_over_bswa')} | "
                         f"{f('full_over_fam')} |")
        lines.append("")
    if result.get("train"):
        lines += ["| LoRA step, N | rank | BSWA s | FAM s | FAM/BSWA |", "|---:|---:|---:|---:|---:|"]
        lines += [f"| {r['n']} | {r['lora_rank']} | {r['error']} | | |" if "error" in r else
                  f"| {r['n']} | {r['lora_rank']} | {r['bswa_s']:.2f} | {r['fam_s']:.2f} | {r['fam_over_bswa']:.3f} |"
                  for r in result["train"]]
        lines.append("")
    if result.get("decode"):
        lines += ["| variant | context | ms/token | vs shortest |", "|---|---:|---:|---:|"]
        lines += [f"| {r['variant']} | {r['context']} | {r['ms_per_token']:.2f} | {r['vs_shortest']:.2f} |"
                  for r in result["decode"]]
        lines.append("")
    if result.get("targets"):
        lines += ["| target | measured | met |", "|---|---:|:---:|"]
        lines += [f"| {name} | {'–' if t['value'] is None else t['value']} | {'yes' if t['met'] else 'no'} |"
                  for name, t in result["targets"].items()]
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
