"""hf-fam finetune's options are the training options' dataclass fields, declared once (hf_fam/training/options.py):
the command line's defaults are the API's, every declared flag reaches its field, and the command states none."""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

from hf_fam.cli import build_parser
from hf_fam.cli.commands.finetune import config_from_args
from hf_fam.training.options import (
    DataOptions,
    FAMRecipeConfig,
    FinetuneConfig,
    LoraOptions,
    ModelOptions,
    TrainOptions,
)

OPTIONS = (ModelOptions, DataOptions, LoraOptions, FAMRecipeConfig, TrainOptions)


def _finetune_parser() -> argparse.ArgumentParser:
    (action,) = [a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)]
    return action.choices["finetune"]


def test_command_line_defaults_are_the_api_defaults():
    args = build_parser().parse_args(["finetune", "some-model", "--output", "runs/x"])
    assert config_from_args(args) == FinetuneConfig(model=ModelOptions(path="some-model"),
                                                    train=TrainOptions(output_dir="runs/x"))


def test_every_declared_flag_sets_its_field():
    parser = _finetune_parser()
    by_dest = {a.dest: a for a in parser._actions}
    for options in OPTIONS:
        for f in dataclasses.fields(options):
            if "flag" not in f.metadata:
                continue
            action = by_dest[f.name]
            flags = f.metadata["flag"] if isinstance(f.metadata["flag"], tuple) else (f.metadata["flag"],)
            assert set(action.option_strings) == set(flags), f.name
            assert action.help == f.metadata["help"], f.name
    values = ["finetune", "m", "-o", "o", "--steps", "7", "--lr", "0.003", "--lora-targets", "q_proj, v_proj",
              "--freeze-fam-init", "--data", "text", "--text-files", "a.txt", "b.txt", "--state-passing-prob", "0.25",
              "--seed", "5", "--force", "--dtype", "bfloat16", "--block-size", "16"]
    config = config_from_args(build_parser().parse_args(values))
    assert (config.train.max_steps, config.train.learning_rate, config.train.seed, config.train.overwrite) == \
        (7, 0.003, 5, True)
    assert config.lora.target_modules == ("q_proj", "v_proj") and config.lora.train_fam_init is False
    assert config.data.source == "text" and config.data.text_files == ("a.txt", "b.txt")
    assert config.recipe.state_passing_prob == 0.25 and config.recipe.seed == 5
    assert config.model.dtype == "bfloat16" and config.model.block_size == 16
    mixed = config_from_args(build_parser().parse_args(["finetune", "m", "-o", "o", "--data", "mix", "--text-files",
                                                        "a.txt", "--text-fraction", "0.25"]))
    assert (mixed.data.source, mixed.data.text_files, mixed.data.text_fraction) == ("mix", ("a.txt",), 0.25)


def test_the_command_declares_no_option_of_its_own():
    source = (Path(__file__).resolve().parents[1] / "hf_fam" / "cli" / "commands" / "finetune.py").read_text()
    assert "default=" not in source.replace('kwargs["default"] = f.default', "")
    assert "add_argument(\"--" not in source


def test_eval_options_are_the_passkey_evaluation_fields():
    """hf-fam eval's passkey options are PasskeyEvalConfig's fields (hf_fam/evaluation/options.py): same defaults
    as the API, and each flag reaches its field."""
    from hf_fam.cli.fam_args import options_from_args
    from hf_fam.evaluation.options import PasskeyEvalConfig

    args = build_parser().parse_args(["eval", "m"])
    assert options_from_args(PasskeyEvalConfig, args, lengths=[1024]) == PasskeyEvalConfig()
    args = build_parser().parse_args(["eval", "m", "--trials", "9", "--form", "synthetic", "--depth", "0.5",
                                      "--seed", "3", "--batch-size", "2", "--chunk-tokens", "64",
                                      "--vocab-offset", "4"])
    assert options_from_args(PasskeyEvalConfig, args, lengths=[64]) == PasskeyEvalConfig(
        lengths=[64], trials=9, form="synthetic", depth=0.5, seed=3, batch_size=2, chunk_tokens=64, vocab_offset=4)
    source = (Path(__file__).resolve().parents[1] / "hf_fam" / "cli" / "commands" / "eval.py").read_text()
    assert "--trials" not in source.split("add_options(p, PasskeyEvalConfig)")[0]
