"""`hf-fam card`: (re)generate the model card, README.md, of a FAM checkpoint or of a LoRA adapter of one."""

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
        help="regenerate the model card (README.md) of a FAM checkpoint or of a LoRA adapter of one",
        description=textwrap.fill(
            "Rewrite PATH/README.md from the template in model_cards/: the FAM settings, attention window "
            "and cache size come from PATH/config.json; base model, license, fam_init and evaluation results are read "
            "back from the previous card's metadata unless given here. The card's text is regenerated: edits to it "
            "are not kept (change the template instead). For a LoRA adapter folder (hf-fam finetune's output) the "
            "adapter's card is written: its base's FAM settings (from the base's config.json, a folder or a Hub "
            "repo), the adapter's LoRA settings and training, and the results given.",
            width=100,
        ),
        formatter_class=RawDescriptionHelpFormatter,
        epilog=EVAL_HELP,
    )
    p.add_argument("path", metavar="PATH", help="a FAM checkpoint folder, or a LoRA adapter folder")
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
    from ...checkpoint_io.publish_adapter import is_adapter_folder

    if is_adapter_folder(folder):
        return _adapter_card(folder, args)
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


def _adapter_card(folder, args) -> int:
    """The card of the LoRA adapter in `folder`, with its base's settings (`--base-model`: the base's Hub id to
    show, read from the folder the adapter names when it is there)."""
    import json
    from dataclasses import replace
    from pathlib import Path

    from ...checkpoint_io.adapter_card import adapter_card_info, write_adapter_card
    from ...checkpoint_io.cards import load_eval_results
    from ...checkpoint_io.checkpoint import read_config

    if args.fine_tuned:
        raise ValueError("--fine-tuned is for a checkpoint's card; an adapter's card says what was trained")
    named = json.loads((folder / "adapter_config.json").read_text()).get("base_model_name_or_path") or ""
    local = Path(named).expanduser() if named and Path(named).expanduser().is_dir() else None
    base = args.base_model or named
    if not base:
        raise ValueError(f"{folder}'s adapter names no base; pass --base-model with the Hub id of its FAM base")
    base_config = read_config(local) if local is not None else _hub_config(base)
    info = adapter_card_info(folder, local)
    overrides = {"license": args.license, "repo_id": args.repo_id,
                 "eval_results": [r for p in args.eval_results for r in load_eval_results(p)]
                 if args.eval_results else None}
    info = replace(info, **{k: v for k, v in overrides.items() if v is not None})
    path = write_adapter_card(folder, base_model=base, base_config=base_config, info=info, name=info.repo_id)
    print(f"wrote {path}")
    return 0


def _hub_config(repo_id: str) -> dict:
    import json

    from huggingface_hub import hf_hub_download

    try:
        return json.loads(open(hf_hub_download(repo_id, "config.json")).read())
    except OSError as err:  # not on the Hub, or no network and not in the cache
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise FileNotFoundError(f"cannot read the config.json of {repo_id}, the adapter's base ({first}); check the "
                                "id and the network") from None
