"""The small-model suite's report (`hf_fam.apps.bench`): its targets, the markdown table and the plots."""

from __future__ import annotations

from pathlib import Path


def check_targets(result: dict) -> dict:
    """The targets of the performance issue, each with the measured figure and whether it holds."""
    t = {}
    if "train" in result:
        t["train FAM/BSWA <= 1.15"] = _target(result["train"]["fam_over_bswa"], 1.15)
    if "prefill" in result:
        longest = max(result["prefill"], key=lambda r: r["n"])
        t["prefill FAM/BSWA <= 1.10"] = _target(longest["fam_over_bswa"], 1.10, at=longest["n"])
        t["peak memory FAM/BSWA <= 1.05"] = _target(longest["fam_over_bswa_memory"], 1.05, at=longest["n"])
        at32 = next((r for r in result["prefill"] if r["n"] == 32768 and "full_over_fam" in r), None)
        if at32:
            t["prefill 32k full/FAM >= 5"] = _target(at32["full_over_fam"], 5.0, above=True)
        at16 = next((r for r in result["prefill"] if r["n"] == 16384 and "full_over_fam" in r), None)
        if at16:
            t["prefill 16k full/FAM >= 3"] = _target(at16["full_over_fam"], 3.0, above=True)
        # beyond one chunk (and the window), reading more tokens must not need more memory
        chunk = result["config"]["chunk"]
        fam = sorted((r["n"], r["fam_peak_mib"]) for r in result["prefill"] if chunk > 0 and r["n"] >= chunk)
        if len(fam) > 1:
            t[f"FAM prefill memory flat in N >= {chunk} (max/min <= 1.1)"] = _target(
                max(m for _, m in fam) / min(m for _, m in fam), 1.1
            )
    if "decode" in result:
        fam = {r["context"]: r for r in result["decode"] if r["variant"] == "fam"}
        for n, name in ((65536, "64k"), (262144, "256k"), (1048576, "1M")):
            if n in fam:
                t[f"decode {name} / {min(fam) // 1024}k <= 1.1"] = _target(fam[n][f"ratio_vs_{min(fam)}"], 1.1)
    if "stream" in result:
        t["1M-token stream memory / 32k <= 1.1"] = _target(result["stream"]["ratio"], 1.1)
    return t


def _target(value: float, bound: float, above: bool = False, at: int | None = None) -> dict:
    ok = value >= bound if above else value <= bound
    out = {"value": round(value, 3), "bound": bound, "met": bool(ok)}
    if at is not None:
        out["n"] = at
    return out


def format_markdown(result: dict) -> str:
    cfg = result["config"]
    lines = [f"Model: Llama, hidden {cfg['hidden']}, {cfg['layers']} layers, {cfg['dtype']}, {cfg['device']}; "
             f"C={cfg['block_size']}, M={cfg['memory_segments']}, F={cfg['fam_length']}; "
             f"{result['machine'].get('gpu', str(result['machine']['cpus']) + ' CPUs')}", ""]
    if "prefill" in result:
        lines += ["| N | full s | BSWA s | FAM s | FAM/BSWA | full/FAM | full MiB | BSWA MiB | FAM MiB |",
                  "|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for r in result["prefill"]:
            f = lambda k, d=2: f"{r[k]:.{d}f}" if k in r else "–"  # noqa: E731
            lines.append(f"| {r['n']} | {f('full_s')} | {f('bswa_s')} | {f('fam_s')} | {f('fam_over_bswa')} | "
                         f"{f('full_over_fam')} | {f('full_peak_mib', 0)} | {f('bswa_peak_mib', 0)} | "
                         f"{f('fam_peak_mib', 0)} |")
        lines.append("")
    if "train" in result:
        r = result["train"]
        lines += [f"Training step ({r['tokens']} tokens): BSWA {r['bswa_s']:.3f} s, FAM {r['fam_s']:.3f} s, "
                  f"FAM/BSWA {r['fam_over_bswa']:.3f}", ""]
    if "decode" in result:
        lines += ["| variant | context | ms/token | vs shortest |", "|---|---:|---:|---:|"]
        for r in result["decode"]:
            ratio = next(v for k, v in r.items() if k.startswith("ratio_vs_"))
            lines.append(f"| {r['variant']} | {r['context']} | {r['ms_per_token']:.2f} | {ratio:.2f} |")
        lines.append("")
    if "stream" in result:
        r = result["stream"]
        lines += [f"Stream of {r['tokens']:,} tokens: peak {r['peak_mib']:.0f} MiB, "
                  f"{r['ratio']:.3f}x the peak at 32k", ""]
    if result.get("targets"):
        lines += ["| target | measured | met |", "|---|---:|:---:|"]
        for name, t in result["targets"].items():
            lines.append(f"| {name} | {t['value']} | {'yes' if t['met'] else 'no'} |")
    return "\n".join(lines) + "\n"


def plot(result: dict, stem: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    if "prefill" in result:
        fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4), dpi=110)
        for v, style in (("full", "o-"), ("bswa", "s--"), ("fam", "^-")):
            pts = [(r["n"], r[f"{v}_s"], r[f"{v}_peak_mib"]) for r in result["prefill"] if f"{v}_s" in r]
            if pts:
                a.plot([p[0] for p in pts], [p[1] for p in pts], style,
                       label=v.upper() if v != "full" else "full attention")
                b.plot([p[0] for p in pts], [p[2] for p in pts], style,
                       label=v.upper() if v != "full" else "full attention")
        for ax, ylabel in ((a, "prefill time (s)"), (b, "peak memory (MiB)")):
            ax.set_xscale("log", base=2)
            ax.set_xlabel("tokens read")
            ax.set_ylabel(ylabel)
            ax.grid(alpha=0.3)
            ax.legend()
        a.set_yscale("log")
        fig.tight_layout()
        paths.append(stem.parent / f"{stem.name}_prefill.png")
        fig.savefig(paths[-1])
        plt.close(fig)
    if "decode" in result:
        fig, ax = plt.subplots(figsize=(5, 4), dpi=110)
        for v, style in (("full", "o-"), ("bswa", "s--"), ("fam", "^-")):
            pts = [(r["context"], r["ms_per_token"]) for r in result["decode"] if r["variant"] == v]
            if pts:
                ax.plot(*zip(*pts), style, label=v.upper() if v != "full" else "full attention")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("context (tokens)")
        ax.set_ylabel("decode ms/token")
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        paths.append(stem.parent / f"{stem.name}_decode.png")
        fig.savefig(paths[-1])
        plt.close(fig)
    return paths
