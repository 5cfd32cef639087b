"""What the demo leaves behind: the checkpoint with its card, the result table, the summary over seeds."""

from __future__ import annotations

from pathlib import Path

from .config import DemoConfig


def require_matplotlib(what: str) -> None:
    """Raise a one-line ImportError naming the extra to install when matplotlib, needed for `what`, is missing."""
    import importlib.util

    if importlib.util.find_spec("matplotlib") is None:
        raise ImportError(f"{what} needs matplotlib, which is not installed: pip install 'hf-fam[demo]' "
                          "(or pip install matplotlib)")


def save_checkpoint(model, eval_result: dict, path: Path, config: DemoConfig) -> Path:
    """Save the trained FAM model with a model card carrying its evaluation."""
    from ...checkpoint_io.cards import CardInfo, load_eval_results, write_model_card
    from ...evaluation import write_json

    model.save_pretrained(path)
    write_json({"results": eval_result["results"]}, path / "eval_results.json")
    info = CardInfo(
        fam_init=f"random normal (std 0.02, seed {config.seed + 1}), fine-tuned with the model",
        fine_tuned=True,
        license="apache-2.0",
        eval_results=load_eval_results(path / "eval_results.json"),
        tags=["passkey", "demo"],
    )
    write_model_card(path, info)
    return path


def format_table(results: dict) -> str:
    """The demo's result table (markdown)."""
    fam, bswa = results["runs"]["FAM"]["eval"]["rows"], results["runs"]["BSWA"]["eval"]["rows"]

    def pct(x):
        return "–" if x is None else f"{100 * x:.1f}"

    lines = [
        f"Passkey retrieval, window C·(M+1) = {results['window']} tokens; beyond reach = key more than "
        f"L·M = {results['reach_blocks']} blocks back ({results['minutes']} min in all)",
        "",
        "| length | × window | FAM all | BSWA all | FAM beyond reach | BSWA beyond reach | beyond-reach trials |",
        "|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for f, b in zip(fam, bswa):
        lines.append(f"| {f['length']} | {f['window_multiple']:g} | {pct(f['accuracy'])} | {pct(b['accuracy'])} | "
                     f"{pct(f.get('beyond_reach_accuracy'))} | {pct(b.get('beyond_reach_accuracy'))} | "
                     f"{f.get('beyond_reach_trials', 0)} |")
    for v in ("FAM", "BSWA"):
        h = results["runs"][v]["history"]
        lines.append(f"\n{v}: fine-tuned {h['steps']} steps in {h['seconds']} s, up to {h['final_train_len']} tokens")
    return "\n".join(lines)


def summarize_seeds(all_results: list[dict]) -> dict:
    """Mean and spread (min, max) over seeds of every accuracy in the table."""
    out = {}
    for v in ("FAM", "BSWA"):
        rows = [r["runs"][v]["eval"]["rows"] for r in all_results]
        per_length = []
        for i, first in enumerate(rows[0]):
            vals = {k: [r[i].get(k) for r in rows] for k in ("accuracy", "beyond_reach_accuracy")}
            entry = {"length": first["length"], "window_multiple": first["window_multiple"]}
            for k, xs in vals.items():
                xs = [x for x in xs if x is not None]
                entry[k] = {"mean": sum(xs) / len(xs), "min": min(xs), "max": max(xs)} if xs else None
            per_length.append(entry)
        out[v] = per_length
    return out
