"""A model name that is no local folder, with the Hub out of reach: one line at once, not ~30 s of retries first;
a name the Hub cache holds still loads, from the cache."""

from __future__ import annotations

import shutil
import time

import pytest
from huggingface_hub import constants

from hf_fam.cli import main
from hf_fam.runtime.loading import hub_access, load_fam_model
from hf_fam.tiny import make_tiny_checkpoint


@pytest.fixture
def no_hub(tmp_path, monkeypatch):
    """An endpoint that refuses connections (port 9 on this machine), no proxy, an empty Hub cache."""
    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    for name in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(name, raising=False)
    return tmp_path / "hub"


def test_unreachable_hub_fails_at_once_in_one_line(no_hub, capsys):
    start = time.perf_counter()
    with pytest.raises(FileNotFoundError) as err:
        load_fam_model("llama-tiny-typo")
    assert time.perf_counter() - start < 5  # was ~27 s of retries
    assert str(err.value) == (
        "no checkpoint at llama-tiny-typo: no such folder, the Hub (127.0.0.1) is unreachable (Connection refused), "
        "and the Hub cache does not hold it; check the name (a local folder: its path, e.g. ./NAME)")
    assert main(["generate", "llama-tiny-typo", "--prompt", "hi"]) == 2
    err_lines = capsys.readouterr().err.strip().splitlines()
    assert len(err_lines) == 1 and err_lines[0].startswith("hf-fam generate: error: no checkpoint at llama-tiny-typo")


def test_offline_mode_names_itself(no_hub, monkeypatch):
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(FileNotFoundError, match="no such folder, HF_HUB_OFFLINE is set, and the Hub cache does not"):
        load_fam_model("llama-tiny-typo")


def test_invalid_hub_id(no_hub):
    with pytest.raises(FileNotFoundError, match="no checkpoint at two words: no such folder, and not a valid Hub id"):
        hub_access("two words")


def test_a_cached_model_loads_from_the_cache_while_the_hub_is_unreachable(no_hub, tmp_path):
    ckpt = make_tiny_checkpoint(tmp_path / "tiny-llama", "llama")
    snapshot = no_hub / "models--someone--tiny-llama" / "snapshots" / ("0" * 40)
    shutil.copytree(ckpt, snapshot)
    (no_hub / "models--someone--tiny-llama" / "refs").mkdir()
    (no_hub / "models--someone--tiny-llama" / "refs" / "main").write_text("0" * 40)
    assert hub_access("someone/tiny-llama") == {"local_files_only": True}
    start = time.perf_counter()
    model, tokenizer = load_fam_model("someone/tiny-llama")
    assert time.perf_counter() - start < 20
    assert model.config.model_type == "fam" and tokenizer is not None
