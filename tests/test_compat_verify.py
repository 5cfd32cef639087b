"""`hf-fam verify` names a checkpoint whose code is older than the installed hf_fam's, and `--refresh-code`
replaces that code (and the config's auto_map) without touching the weights."""

from __future__ import annotations

import json

import torch
from convert_helpers import make_source, tree_hashes
from transformers import AutoModelForCausalLM

import hf_fam
from hf_fam.checkpoint_io.checkpoint import AUTO_MAP, MODELING_DIR, code_transformers_range, remote_code_age
from hf_fam.checkpoint_io.convert import ConvertOptions, convert
from hf_fam.checkpoint_io.inspection import verify_checkpoint
from hf_fam.cli import main
from hf_fam.modeling.fam_compat import SUPPORTED_TRANSFORMERS

RANGE_LINE = 'SUPPORTED_TRANSFORMERS = ("%s", "%s")' % SUPPORTED_TRANSFORMERS


def _convert(tmp_path):
    src = make_source(tmp_path / "src", "llama")
    out = tmp_path / "fam"
    convert(src, out, ConvertOptions(block_size=4, memory_segments=1, fam_length=2, progress=False))
    return out


def _age(out, new_line: str | None):
    """Make the checkpoint's fam_compat.py look as another hf_fam wrote it: another range line, or none at all
    (code from before the range existed), and one more edited file."""
    compat = out / "fam_compat.py"
    text = compat.read_text()
    assert RANGE_LINE in text
    compat.write_text(text.replace(RANGE_LINE, new_line or "TRANSFORMERS_VERSION = (5, 24)"))
    forward = out / "fam_forward.py"
    forward.write_text(forward.read_text().replace("set_output_cache(outputs, cache)", "outputs['cache'] = cache"))


def test_verify_names_older_code_and_the_refresh_command(tmp_path, capsys):
    out = _convert(tmp_path)
    assert remote_code_age(out) == "identical"
    _age(out, None)  # code from before the supported range: it pinned transformers 5.24
    assert code_transformers_range(out) is None and remote_code_age(out) == "older"
    capsys.readouterr()
    assert main(["verify", str(out)]) == 1
    err = capsys.readouterr().err.splitlines()
    floor, ceiling = SUPPORTED_TRANSFORMERS
    assert err[1:] == [
        f"  code: fam_compat.py differs (installed hf_fam {hf_fam.__version__})",
        f"  code: fam_forward.py differs (installed hf_fam {hf_fam.__version__})",
        "  code: older than the installed hf_fam's (it supports only the transformers release it was written for; "
        f"the installed hf_fam {hf_fam.__version__}'s supports transformers {floor} to {ceiling}); refresh it "
        f"without touching the weights: hf-fam verify --refresh-code {out}",
    ]


def test_older_and_newer_ranges(tmp_path):
    out = _convert(tmp_path)
    floor, ceiling = SUPPORTED_TRANSFORMERS
    major, minor = (int(p) for p in ceiling.split("."))
    _age(out, f"SUPPORTED_TRANSFORMERS = ({floor!r}, '{major}.{minor - 1}')")
    assert remote_code_age(out) == "older"
    assert any("older than the installed hf_fam's" in p for p in verify_checkpoint(out))
    _age_again = (out / "fam_compat.py").read_text().replace(f"'{major}.{minor - 1}'", f"'{major}.{minor + 1}'")
    (out / "fam_compat.py").write_text(_age_again)
    assert code_transformers_range(out) == (floor, f"{major}.{minor + 1}")
    assert remote_code_age(out) == "newer"
    assert any("newer than the installed hf_fam's" in p and "pip install -U hf-fam" in p
               for p in verify_checkpoint(out))
    (out / "fam_compat.py").write_text((MODELING_DIR / "fam_compat.py").read_text())
    assert remote_code_age(out) == "differs"  # fam_forward.py still edited, same range: no age line
    assert not any("older" in p or "newer" in p for p in verify_checkpoint(out))


def test_refresh_code_replaces_code_and_auto_map_only(tmp_path, capsys):
    out = _convert(tmp_path)
    ids = torch.randint(3, 101, (1, 11), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = AutoModelForCausalLM.from_pretrained(out).eval()(ids).logits
    _age(out, None)
    (out / "fam_cache.py").unlink()
    config = json.loads((out / "config.json").read_text())
    config["auto_map"] = {"AutoConfig": "configuration_fam.FAMConfig"}  # as an older hf_fam might have written it
    (out / "config.json").write_text(json.dumps(config, indent=2))
    before = tree_hashes(out)
    capsys.readouterr()
    assert main(["verify", "--refresh-code", str(out)]) == 0
    printed = capsys.readouterr().out.splitlines()
    assert printed[0] == (f"{out}: refreshed fam_cache.py, fam_compat.py, fam_forward.py, config.json from hf_fam "
                          f"{hf_fam.__version__}; weights untouched")
    assert printed[1].startswith(f"{out}: OK")
    after = tree_hashes(out)
    changed = {name for name in before.keys() | after.keys() if before.get(name) != after.get(name)}
    assert changed == {"fam_cache.py", "fam_compat.py", "fam_forward.py", "config.json"}
    refreshed = json.loads((out / "config.json").read_text())
    assert refreshed == {**config, "auto_map": AUTO_MAP}  # every other entry kept
    assert verify_checkpoint(out) == [] and remote_code_age(out) == "identical"
    with torch.no_grad():
        assert torch.equal(AutoModelForCausalLM.from_pretrained(out).eval()(ids).logits, expected)
    assert main(["verify", "--refresh-code", str(out)]) == 0
    assert "refreshed nothing (code already current)" in capsys.readouterr().out


def test_refresh_code_refuses_a_folder_that_is_not_a_fam_checkpoint(tmp_path, capsys):
    src = make_source(tmp_path / "src", "llama")
    before = sorted(p.name for p in src.iterdir())
    capsys.readouterr()
    assert main(["verify", "--refresh-code", str(src)]) == 2
    assert "not a FAM checkpoint" in capsys.readouterr().err
    assert sorted(p.name for p in src.iterdir()) == before
