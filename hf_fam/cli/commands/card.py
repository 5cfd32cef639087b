"""`hf-fam card`: (re)generate a FAM checkpoint's model card, README.md."""

from __future__ import annotations

import textwrap

from ..formatting import RawDescriptionHelpFormatter

EVAL_HELP = """\
evaluation results JSON: a list, or {"results": [...]}, of entries like
  {"task": "passkey retrieval", "metric": "accuracy", "value": 0.98,
   "dataset": "synthetic passkey", "setting": "8192 tokens (4x window), beyond reach"}
task, metric and value are required. They replace the card's previous results."""


def register(sub) -> None:
    p = sub.add_parser(
        "card",
        help="regenerate a FAM checkpoint's model card (README.md)",
        description=textwrap.fill(
            "Rewrite PATH/README.md from the template in model_cards/: the FAM settings, attention window "
            "and cache size come from PATH/config.json; base model, license, fam_init and evaluation results are read "
            "back from the previous card's metadata unless given here. The card's text is regenerated: edits to it "
            "are not kept (change the template instead).",
            width=100,
        ),
        formatter_class=RawDescriptionHelpFormatter,
        epilog=EVAL_HELP,
    )
    p.add_argument("path", metavar="PATH", help="a FAM checkpoint folder")
    p.add_argument("--eval-results", metavar="JSON", action="append",
                   help="evaluation results to show (see below); repeat to combine several files, e.g. the JSON "
                   "of `hf-fam eval --task passkey` and of `--task perplexity`")
    p.add_argument("--base-model", metavar="ID", help="Hub id of the base model")
    p.add_argument("--license", help="license id (e.g. apache-2.0, llama3.2, gemma)")
    p.add_argument("--repo-id", metavar="ID", help="Hub id for the usage snippet (default: PATH's folder name)")
    p.add_argument("--fine-tuned", action="store_true", help="state that the model was fine-tuned with FAM")
    p.set_defaults(func=run)


def run(args) -> int:
    from pathlib import Path

    from ...checkpoint_io.cards import load_eval_results, regenerate_model_card
    from ...checkpoint_io.checkpoint import read_config

    folder = Path(args.path)
    if not folder.is_dir():
        raise FileNotFoundError(f"{args.path} is not a folder; pass a FAM checkpoint folder")
    read_config(folder)  # a clear error for a folder without config.json
    path = regenerate_model_card(
        folder,
        base_model=args.base_model,
        license=args.license,
        repo_id=args.repo_id,
        fine_tuned=True if args.fine_tuned else None,
        eval_results=[r for path in args.eval_results for r in load_eval_results(path)] if args.eval_results else None,
    )
    print(f"wrote {path}")
    return 0
