"""`hf-fam push`: upload a FAM checkpoint folder, or a LoRA adapter of one, to a Hub model repo, verified, with its
model card."""

from __future__ import annotations

import textwrap


def register(sub) -> None:
    p = sub.add_parser(
        "push",
        help="upload a FAM checkpoint folder, or a LoRA adapter of one, to the Hub (checked first, with its card)",
        description=textwrap.fill(
            "Upload PATH's files to the Hub model repo REPO_ID (created if missing) in one commit, so that others "
            "load it with AutoModelForCausalLM.from_pretrained(REPO_ID, trust_remote_code=True). PATH is checked "
            "first (config.json, every weight, every code file its code imports; nothing is uploaded otherwise); "
            "code from another hf_fam release goes up as it is, with a note. A card hf_fam wrote is rendered again "
            "with REPO_ID in its usage snippet; a card of your own is uploaded as it is; PATH itself is not "
            "modified. A LoRA adapter folder (hf-fam finetune's output) goes up once its FAM base is on the Hub: "
            "push the base first (OUT/fam_base, or the checkpoint trained), then the adapter with --base-model "
            "naming the base's repo; others load it with peft's AutoPeftModelForCausalLM.from_pretrained(REPO_ID, "
            "trust_remote_code=True). Log in first (`hf auth login`) or pass --token.",
            width=100,
        ),
    )
    p.add_argument("path", metavar="PATH", help="a FAM checkpoint folder (from hf-fam convert, or a merged fine-tune), "
                   "or a LoRA adapter folder (hf-fam finetune's output)")
    p.add_argument("repo_id", metavar="REPO_ID", help="the Hub repo, namespace/name (or name, under your user)")
    p.add_argument("--base-model", metavar="REPO_ID",
                   help="for an adapter: the Hub repo of its FAM base, pushed first (default: the base the adapter "
                        "names, when that is a Hub repo)")
    p.add_argument("--base-revision", metavar="REV",
                   help="for an adapter: the branch, tag or commit of the base it applies to, pinned as a commit in "
                        "the pushed adapter_config.json (default: the revision the adapter names, else main)")
    p.add_argument("--private", action="store_true", help="create the repo private (an existing repo keeps its own)")
    p.add_argument("--revision", help="branch to push to (created if missing; default: main)")
    p.add_argument("--create-pr", action="store_true", help="open a pull request instead of committing")
    p.add_argument("--commit-message",
                   help="default: 'Upload FAM checkpoint' (an adapter: 'Upload LoRA adapter for a FAM checkpoint')")
    p.add_argument("--token", help="Hub token with write access (default: the stored login / HF_TOKEN)")
    p.set_defaults(func=run)


def run(args) -> int:
    from ...checkpoint_io.publish import push_to_hub

    commit = push_to_hub(args.path, args.repo_id, base_model=args.base_model,
                         base_revision=args.base_revision, private=True if args.private else None,
                         token=args.token, revision=args.revision, create_pr=args.create_pr,
                         commit_message=args.commit_message)
    url = getattr(commit, "pr_url", None) or getattr(commit, "commit_url", None) or str(commit)
    print(f"pushed {args.path} to {args.repo_id}: {url}")
    return 0
