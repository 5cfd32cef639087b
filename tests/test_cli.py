"""`hf-fam`'s help and argument errors: instant (no torch), each default stated once, only real flags named."""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import textwrap

from hf_fam.cli import HelpFormatter, build_parser, supported_families
from hf_fam.modeling.fam_adapters import supported_model_types


def _subparsers() -> dict[str, argparse.ArgumentParser]:
    parser = build_parser()
    (action,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return dict(action.choices)


def test_family_list_is_the_adapter_table():
    assert supported_families() == ", ".join(supported_model_types())
    for name in ("generate", "finetune", "convert"):
        text = _subparsers()[name].format_help()
        assert all(t in " ".join(text.split()) for t in supported_model_types()), name


def test_help_and_argument_errors_do_not_import_torch():
    """As the console script runs: every command's --help, and an argument a command refuses, leave torch
    unimported (importing it takes seconds)."""
    script = textwrap.dedent(
        """
        import sys
        sys.argv[0] = "hf-fam"  # what the console script sees
        from hf_fam.cli import COMMANDS, main
        for argv in [["--help"]] + [[name, "--help"] for name in COMMANDS]:
            try:
                main(argv)
            except SystemExit as exit:
                assert exit.code == 0, argv
        assert main(["generate", "nowhere", "--prompt", "hi", "--max-new-tokens", "0"]) == 2
        assert main(["generate", "nowhere", "--prompt", ""]) == 2
        print("torch imported:", "torch" in sys.modules)
        """
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().endswith("torch imported: False"), out.stdout[-500:]


def test_python_dash_m_errors_are_one_line():
    """`python -m hf_fam.cli` (as accelerate launch and torchrun run it) prints a command's refusal as one line."""
    out = subprocess.run([sys.executable, "-m", "hf_fam.cli", "generate", "nowhere", "--prompt", "hi",
                          "--max-new-tokens", "0"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 2
    assert out.stderr.strip().splitlines() == ["hf-fam generate: error: --max-new-tokens must be >= 1, got 0"]


def test_python_dash_m_help_does_not_import_torch():
    out = subprocess.run([sys.executable, "-X", "importtime", "-m", "hf_fam.cli", "--help"], capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0 and "finetune" in out.stdout
    assert not re.search(r"\|\s+torch$", out.stderr, flags=re.M)


def test_each_default_is_stated_once_and_every_option_explained():
    for name, sub in _subparsers().items():
        formatter = HelpFormatter(prog=sub.prog)
        for action in sub._actions:
            if action.help is argparse.SUPPRESS:
                continue
            text = formatter._expand_help(action) if action.help else ""
            assert text, f"hf-fam {name} {action.option_strings or action.dest}: no help"
            assert text.count("default") <= 1, f"hf-fam {name} {action.option_strings}: {text}"
            assert "(default: None)" not in text and "(default: [" not in text, text


def test_flags_named_in_help_texts_exist():
    """`card --eval` was named by `eval --help`; the flag is --eval-results."""
    subs = _subparsers()
    texts = [sub.format_help() for sub in subs.values()] + [build_parser().format_help()]
    pattern = re.compile(r"hf-fam (\w+) (--[\w-]+)")
    named = {pair for text in texts for pair in pattern.findall(" ".join(text.split()))}
    assert ("card", "--eval-results") in named
    for cmd, flag in named:
        assert cmd in subs and flag in subs[cmd]._option_string_actions, f"help names hf-fam {cmd} {flag}"
