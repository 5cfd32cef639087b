"""`hf-fam inspect`: what a FAM checkpoint is, read from its files without loading the model."""

from __future__ import annotations


def register(sub) -> None:
    p = sub.add_parser(
        "inspect",
        help="summarise a FAM checkpoint: architecture, C/M/F, window, parameters, cache, code status",
        description="Print a FAM checkpoint's base architecture, FAM settings (C, M, F), attention window "
        "C*(M+1), parameter count, the KV-cache bytes per layer and sequence a stream holds (constant), and "
        "whether its remote-code files are identical to the installed hf_fam's. Reads config.json, the code "
        "files and the safetensors headers only.",
    )
    p.add_argument("path", metavar="PATH", help="a local FAM checkpoint folder")
    p.add_argument("--json", action="store_true", help="print the figures as JSON")
    p.set_defaults(func=run)


def run(args) -> int:
    import json

    from ...checkpoint_io.inspection import format_report, inspect_checkpoint

    report = inspect_checkpoint(args.path)
    print(json.dumps(report.to_dict(), indent=2) if args.json else format_report(report))
    return 0
