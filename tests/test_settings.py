"""One settings object: FAMSettings (C, M, F, fam_layers) holds the defaults and the derived figures and
flows from the command line to the checkpoint, the model and the cache."""

from __future__ import annotations

import argparse
import json

import pytest
from conftest import random_ids, tiny_model
from convert_helpers import make_source

import hf_fam
from hf_fam import FAMConfig, FAMForCausalLM, FAMSettings
from hf_fam.checkpoint_io.convert import ConvertOptions
from hf_fam.cli.fam_args import add_fam_arguments, settings_from_args

SETTINGS = dict(block_size=4, memory_segments=1, fam_length=3, fam_update="paper")


def test_fam_settings_is_the_one_source_of_defaults():
    defaults = FAMSettings()
    assert (defaults.block_size, defaults.memory_segments, defaults.fam_length,
            defaults.fam_layers) == (1024, 3, 64, "all")
    config = FAMConfig(base_config=tiny_model().config)
    assert config.fam_settings == defaults
    options = ConvertOptions()
    assert FAMSettings(options.block_size, options.memory_segments, options.fam_length, options.fam_layers) == defaults
    parser = argparse.ArgumentParser()
    add_fam_arguments(parser, base_only=False)
    assert settings_from_args(parser.parse_args([])) == defaults
    parsed = parser.parse_args(["--block-size", "8", "--fam-layers", "global"])
    assert settings_from_args(parsed) == FAMSettings(block_size=8, fam_layers="global")
    assert defaults.cache_tokens == (3 + 1) * 1024 + 64 and defaults.attention_window == 4096


def test_cache_mismatch_names_every_setting():
    model = FAMForCausalLM.from_base_model(tiny_model(), **SETTINGS).eval()
    cache = hf_fam.FAMCache(FAMSettings(**SETTINGS, fam_layers="global"))
    with pytest.raises(ValueError, match="fam_layers='global'.*fam_layers='all'"):
        model(random_ids(1, 5), cache=cache, use_cache=True)


def test_convert_writes_fam_layers_and_inspect_reports_it(tmp_path, capsys):
    from hf_fam.cli import main

    src = make_source(tmp_path / "src", "mistral", sliding_window=None)
    out = tmp_path / "fam"
    assert main(["convert", str(src), str(out), "--block-size", "8", "--memory-segments", "1", "--fam-length", "2",
                 "--fam-layers", "global", "--quiet"]) == 0
    config = json.loads((out / "config.json").read_text())
    assert config["fam_layers"] == "global"
    loaded = hf_fam.FAMForCausalLM.from_pretrained(out)
    assert loaded.fam_settings == FAMSettings(8, 1, 2, "global", fam_update="sink")  # convert starts zero-shot
    capsys.readouterr()
    assert main(["inspect", str(out)]) == 0
    assert "fam_layers=global" in capsys.readouterr().out


def test_a_bad_fam_layers_is_refused_by_the_command_line(tmp_path, capsys):
    from hf_fam.cli import main

    with pytest.raises(SystemExit):
        main(["convert", str(tmp_path / "src"), str(tmp_path / "out"), "--fam-layers", "some"])
    assert "invalid choice: 'some'" in capsys.readouterr().err
