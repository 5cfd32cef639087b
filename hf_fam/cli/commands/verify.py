"""`hf-fam verify`: check a FAM checkpoint against the installed hf_fam; exit 1 naming each difference.

`--refresh-code` first replaces the checkpoint's remote-code files (and config.json's auto_map) with the installed
hf_fam's, leaving the weights untouched: how a checkpoint converted by an older hf_fam gets code that supports the
transformers releases the installed one supports.
"""

from __future__ import annotations


def register(sub) -> None:
    p = sub.add_parser(
        "verify",
        help="check a FAM checkpoint's code files and weights against the installed hf_fam",
        description="Check that PATH's remote-code files are byte-identical to the installed hf_fam's, that "
        "config.json is a FAMConfig with the right auto_map, and that every weight the config implies is "
        "present with the right shape and dtype (and no other). The model is not loaded. Exit status 0 when "
        "everything matches, 1 with one line per difference otherwise, 2 when PATH is not a FAM checkpoint.",
    )
    p.add_argument("path", metavar="PATH", help="a local FAM checkpoint folder")
    p.add_argument("--refresh-code", action="store_true",
                   help="first replace PATH's code files (and config.json's auto_map) with the installed hf_fam's; "
                   "the weights are not touched")
    p.set_defaults(func=run)


def run(args) -> int:
    import sys

    import hf_fam

    from ...checkpoint_io.checkpoint import read_config, refresh_remote_code
    from ...checkpoint_io.inspection import fam_summary, verify_checkpoint

    if args.refresh_code:
        fam_summary(read_config(args.path))  # refuses a non-FAM folder before writing anything
        written = refresh_remote_code(args.path)
        print(f"{args.path}: refreshed {', '.join(written) if written else 'nothing (code already current)'} "
              f"from hf_fam {hf_fam.__version__}; weights untouched")
    problems = verify_checkpoint(args.path)
    if problems:
        print(f"{args.path}: {len(problems)} difference(s) from hf_fam {hf_fam.__version__}:", file=sys.stderr)
        for line in problems:
            print(f"  {line}", file=sys.stderr)
        return 1
    print(f"{args.path}: OK (code files identical to hf_fam {hf_fam.__version__}; every weight present with the "
          "right shape and dtype)")
    return 0
