"""`hf-fam verify`: check a FAM checkpoint against the installed hf_fam; exit 1 naming each difference."""

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
    p.set_defaults(func=run)


def run(args) -> int:
    import sys

    import hf_fam

    from ..inspection import verify_checkpoint

    problems = verify_checkpoint(args.path)
    if problems:
        print(f"{args.path}: {len(problems)} difference(s) from hf_fam {hf_fam.__version__}:", file=sys.stderr)
        for line in problems:
            print(f"  {line}", file=sys.stderr)
        return 1
    print(f"{args.path}: OK (code files identical to hf_fam {hf_fam.__version__}; every weight present with the "
          "right shape and dtype)")
    return 0
