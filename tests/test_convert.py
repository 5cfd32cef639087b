"""`hf-fam convert`: tiny Llama / Mistral / Gemma checkpoints, single-file and sharded, become FAM checkpoints
that load where hf_fam cannot be imported and give the logits `hf_fam.patch` gives on the base model."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from conftest import padding_mask, random_ids
from convert_helpers import FAMILIES, INIT_RANGE, LAYOUTS, make_source, run_without_hf_fam, tree_hashes
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

import hf_fam
from hf_fam.checkpoint_io.checkpoint import remote_code_files
from hf_fam.checkpoint_io.convert import ConvertOptions, convert
from hf_fam.checkpoint_io.inspection import verify_checkpoint

SETTINGS = dict(block_size=4, memory_segments=1, fam_length=3)


def _options(**kwargs) -> ConvertOptions:
    # the paper's computation from a random fam_init, as before the zero-shot start became the default
    # (that default is tested in test_zero_shot.py)
    return ConvertOptions(**{**SETTINGS, "progress": False, "fam_init": "random", "fam_update": "paper", **kwargs})


def _fam_init(folder) -> torch.Tensor:
    return _tensors(folder)["fam.fam_init"]


def _tensors(folder) -> dict[str, torch.Tensor]:
    out = {}
    for path in sorted(folder.glob("*.safetensors")):
        out.update(load_file(path))
    return out


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """(family, layout) -> (SRC, OUT, SRC's file hashes before conversion)."""
    root = tmp_path_factory.mktemp("convert")
    cases = {}
    for family in FAMILIES:
        for layout in LAYOUTS:
            src = make_source(root / f"{family}-{layout}", family, layout)
            before = tree_hashes(src)
            out = root / f"{family}-{layout}-fam"
            convert(src, out, _options(repo_id=str(out)))
            cases[(family, layout)] = (src, out, before)
    return root, cases


def test_converted_checkpoints_load_without_hf_fam_and_match_patch(converted):
    root, cases = converted
    ids = random_ids(2, 19, vocab=250)
    mask = padding_mask([19, 12], 19, side="left")
    expected = {}
    for (family, layout), (src, out, _) in cases.items():
        base = AutoModelForCausalLM.from_pretrained(src).eval()
        hf_fam.patch(base, **SETTINGS, fam_init=_fam_init(out), fam_update="paper")
        with torch.no_grad():
            expected[f"{family}-{layout}"] = base(ids, attention_mask=mask).logits
    torch.save({"ids": ids, "mask": mask, "expected": expected}, root / "ref.pt")

    # the model card's usage snippet runs too, as written (its model_id is the local folder)
    card = (cases[("llama", "single")][1] / "README.md").read_text()
    snippet = card.split("```python\n")[1].split("```")[0]
    script = f"""
        import torch
        from transformers import AutoModelForCausalLM
        ref = torch.load({str(root / "ref.pt")!r})
        for name, expected in ref["expected"].items():
            path = {str(root)!r} + "/" + name + "-fam"
            model = AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True).eval()
            assert type(model).__module__.startswith("transformers_modules"), type(model).__module__
            with torch.no_grad():
                got = model(ref["ids"], attention_mask=ref["mask"]).logits
            print("DIFF", name, (got - expected).abs().max().item())
        exec(compile({snippet!r}, "model card snippet", "exec"))
        print("SNIPPET OK")
    """
    result = run_without_hf_fam(script, root)
    assert result.returncode == 0, result.stderr[-3000:]
    diffs = {line.split()[1]: float(line.split()[2]) for line in result.stdout.splitlines() if line.startswith("DIFF")}
    assert set(diffs) == set(expected)
    assert max(diffs.values()) <= 1e-5, diffs
    assert "SNIPPET OK" in result.stdout


def test_logits_depend_on_fam_init(converted):
    """Guards the test above: a different fam_init would have been caught."""
    src, out, _ = converted[1][("llama", "single")]
    ids = random_ids(1, 19, vocab=250)
    logits = []
    for fam_init in (_fam_init(out), _fam_init(out) + 0.1):
        base = hf_fam.patch(AutoModelForCausalLM.from_pretrained(src).eval(), **SETTINGS, fam_init=fam_init,
                            fam_update="paper")
        with torch.no_grad():
            logits.append(base(ids).logits)
    assert (logits[0] - logits[1]).abs().max() > 1e-4


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_output_is_the_base_weights_plus_fam_init_and_src_is_unchanged(converted, family, layout):
    src, out, before = converted[1][(family, layout)]
    assert tree_hashes(src) == before
    base, fam = _tensors(src), _tensors(out)
    assert set(fam) == set(base) | {"fam.fam_init"}
    for name, tensor in base.items():
        assert torch.equal(fam[name], tensor) and fam[name].dtype == tensor.dtype, name
    assert fam["fam.fam_init"].shape == (3, 64) and fam["fam.fam_init"].dtype == torch.float32
    if family == "gemma":
        assert "lm_head.weight" not in fam  # tied embeddings stay tied
    if layout == "sharded":
        src_index = json.loads((src / "model.safetensors.index.json").read_text())
        index = json.loads((out / "model.safetensors.index.json").read_text())
        for name, shard in src_index["weight_map"].items():
            assert index["weight_map"][name] == shard
        assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in fam.values())
        assert index["metadata"]["total_parameters"] == sum(t.numel() for t in fam.values())
    assert verify_checkpoint(out) == []


@pytest.mark.parametrize("family", ["llama", "gemma"])
def test_output_matches_what_save_pretrained_writes(converted, family, tmp_path):
    src, out, _ = converted[1][(family, "single")]
    base = AutoModelForCausalLM.from_pretrained(src)
    reference = tmp_path / "saved"
    hf_fam.FAMForCausalLM.from_base_model(base, **SETTINGS).save_pretrained(reference)

    carried = {"tokenizer.json", "tokenizer_config.json", "README.md"}
    assert {p.name for p in out.iterdir()} == {p.name for p in reference.iterdir()} | carried
    ours, theirs = (json.loads((d / "config.json").read_text()) for d in (out, reference))
    ours["base_config"].pop("_name_or_path")
    theirs["base_config"].pop("_name_or_path")
    assert ours == theirs
    with safe_open(out / "model.safetensors", "pt") as a, safe_open(reference / "model.safetensors", "pt") as b:
        assert set(a.keys()) == set(b.keys()) and a.metadata() == b.metadata()
    for path in remote_code_files():
        assert (out / path.name).read_bytes() == path.read_bytes()


def test_random_fam_init_is_seeded(tmp_path):
    src = make_source(tmp_path / "src", "llama")
    inits = []
    for i, seed in enumerate((0, 0, 1)):
        convert(src, tmp_path / f"out{i}", _options(seed=seed))
        inits.append(_fam_init(tmp_path / f"out{i}"))
    assert torch.equal(inits[0], inits[1]) and not torch.equal(inits[0], inits[2])
    assert 0.5 * INIT_RANGE < inits[0].std() < 2 * INIT_RANGE  # drawn like the other weights


def test_text_fam_init_stores_the_raw_embedding_rows(tmp_path):
    """Gemma scales embeddings by sqrt(hidden) at run time; fam_init holds the unscaled rows, cycled to F."""
    from hf_fam.tiny import byte_tokenizer

    src = make_source(tmp_path / "src", "gemma", "sharded")
    out = tmp_path / "out"
    convert(src, out, _options(fam_length=5, fam_init="text:abc"))
    ids = byte_tokenizer()("abc", add_special_tokens=False)["input_ids"]
    embedding = _tensors(src)["model.embed_tokens.weight"]
    assert torch.equal(_fam_init(out), embedding[[ids[i % 3] for i in range(5)]])
    card = (out / "README.md").read_text()
    assert "token embeddings of the text 'abc'" in card


def test_file_fam_init(tmp_path):
    src = make_source(tmp_path / "src", "mistral")
    init = torch.randn(3, 64)
    save_file({"anything": init}, tmp_path / "init.safetensors")
    torch.save({"fam_init": init * 2}, tmp_path / "init.pt")
    convert(src, tmp_path / "a", _options(fam_init=f"file:{tmp_path / 'init.safetensors'}"))
    convert(src, tmp_path / "b", _options(fam_init=f"file:{tmp_path / 'init.pt'}"))
    assert torch.equal(_fam_init(tmp_path / "a"), init)
    assert torch.equal(_fam_init(tmp_path / "b"), init * 2)


def test_bfloat16_checkpoint_keeps_its_dtype(tmp_path):
    src = make_source(tmp_path / "fp32", "llama")
    AutoModelForCausalLM.from_pretrained(src, dtype=torch.bfloat16).save_pretrained(tmp_path / "bf16")
    out = tmp_path / "out"
    convert(tmp_path / "bf16", out, _options())
    assert _fam_init(out).dtype == torch.bfloat16
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    assert verify_checkpoint(out) == []


@pytest.mark.parametrize("layout", LAYOUTS)
def test_pickle_weights_with_allow_pickle(tmp_path, layout):
    """pytorch_model*.bin is read with weights_only=True and written as safetensors, same tensors."""
    src = make_source(tmp_path / "src", "gemma", layout)
    pickled = tmp_path / "pickled"
    shutil.copytree(src, pickled)
    state = AutoModelForCausalLM.from_pretrained(src).state_dict()  # includes the tied lm_head.weight
    for path in pickled.glob("model*.safetensors*"):
        path.unlink()
    if layout == "single":
        torch.save(state, pickled / "pytorch_model.bin")
    else:
        names = sorted(state)
        halves = {"pytorch_model-00001-of-00002.bin": names[: len(names) // 2],
                  "pytorch_model-00002-of-00002.bin": names[len(names) // 2 :]}
        for file, keys in halves.items():
            torch.save({k: state[k].clone() for k in keys}, pickled / file)
        weight_map = {k: file for file, keys in halves.items() for k in keys}
        (pickled / "pytorch_model.bin.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    out = tmp_path / "out"
    result = convert(pickled, out, _options(allow_pickle=True))
    assert result.dropped_tensors == ["lm_head.weight"]  # tied: the embedding is the head
    assert not list(out.glob("*.bin"))
    fam, base = _tensors(out), _tensors(src)
    assert set(fam) == set(base) | {"fam.fam_init"}
    assert all(torch.equal(fam[k], base[k]) for k in base)
    assert verify_checkpoint(out) == []


def test_carries_tokenizer_generation_config_and_license(tmp_path):
    src = make_source(tmp_path / "src", "llama")
    (src / "LICENSE").write_text("license text\n")
    (src / "README.md").write_text("---\nlicense: apache-2.0\nlanguage:\n- en\n---\n# base card\n")
    (src / "notes.txt").write_text("not part of a checkpoint\n")
    (src / "original").mkdir()
    (src / "original" / "consolidated.00.pth").write_bytes(b"\0" * 16)
    result = convert(src, tmp_path / "out", _options())
    assert result.carried_files == ["LICENSE", "generation_config.json", "tokenizer.json", "tokenizer_config.json"]
    out = tmp_path / "out"
    assert (out / "LICENSE").read_text() == "license text\n"
    assert not (out / "notes.txt").exists() and not (out / "original").exists()
    card = (out / "README.md").read_text()
    assert "license: apache-2.0" in card and "- en" in card and "# base card" not in card


def test_tensors_the_model_does_not_use_are_left_out(tmp_path):
    src = make_source(tmp_path / "src", "llama")
    tensors = load_file(src / "model.safetensors")
    tensors["model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.ones(8)  # as in old Llama checkpoints
    save_file(tensors, src / "model.safetensors", metadata={"format": "pt"})
    result = convert(src, tmp_path / "out", _options())
    assert result.dropped_tensors == ["model.layers.0.self_attn.rotary_emb.inv_freq"]
    assert verify_checkpoint(tmp_path / "out") == []


def test_force_replaces_an_existing_output(tmp_path):
    src = make_source(tmp_path / "src", "llama")
    out = tmp_path / "out"
    out.mkdir()
    (out / "stale.txt").write_text("old")
    convert(src, out, _options(force=True))
    assert not (out / "stale.txt").exists() and (out / "config.json").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "src"]  # no temporary or old folder left


def test_output_folder_permissions_follow_the_umask(tmp_path):
    src = make_source(tmp_path / "src", "llama")
    convert(src, tmp_path / "out", _options())
    assert (tmp_path / "out").stat().st_mode & 0o777 == (tmp_path / "src").stat().st_mode & 0o777


def test_hub_id_goes_through_snapshot_download(tmp_path, monkeypatch):
    """The Hub path, offline: snapshot_download is stood in for by a local folder."""
    import huggingface_hub

    src = make_source(tmp_path / "src", "llama")
    calls = []

    def fake_snapshot_download(**kwargs):
        calls.append(kwargs)
        return str(src)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    out = tmp_path / "out"
    result = convert("someone/tiny-llama", out, _options(revision="v1", token="hf_x"))
    assert result.source == "someone/tiny-llama"
    assert calls[0]["repo_id"] == "someone/tiny-llama" and calls[0]["revision"] == "v1" and calls[0]["token"] == "hf_x"
    assert "*.safetensors" in calls[0]["allow_patterns"] and "*.bin" not in calls[0]["allow_patterns"]
    assert "original/*" in calls[0]["ignore_patterns"]
    config = json.loads((out / "config.json").read_text())
    assert config["base_config"]["_name_or_path"] == "someone/tiny-llama"
    assert "base_model: someone/tiny-llama" in (out / "README.md").read_text()


def test_experts_stored_apart_convert_to_what_the_streamed_route_writes(tmp_path):
    """A mixture of experts whose checkpoint stores each expert apart (transformers fuses them while loading)
    is loaded whole, put in FAM mode and saved: the same files, config and tensors the streamed conversion
    writes for a model whose tensors can be copied (checked on Llama, through the same function)."""
    from pathlib import Path

    from hf_fam.checkpoint_io import convert as convert_module
    from hf_fam.checkpoint_io.fam_init import FamInitSpec
    from hf_fam.checkpoint_io.source import ExpertsStoredApart, open_source
    from hf_fam.tiny import make_tiny_checkpoint, tiny_model

    src = make_tiny_checkpoint(tmp_path / "src", family="llama")
    options = convert_module.ConvertOptions(block_size=4, memory_segments=1, fam_length=2, progress=False)
    streamed = convert_module.convert(src, tmp_path / "streamed", options)
    loaded = convert_module._convert_loaded(Path(src), None, tmp_path / "loaded", options,
                                            FamInitSpec.parse(options.fam_init, seed=options.seed), None)
    assert (loaded.weight_files, loaded.num_tensors, loaded.total_bytes, loaded.carried_files) == (
        streamed.weight_files, streamed.num_tensors, streamed.total_bytes, streamed.carried_files)
    assert sorted(p.name for p in loaded.out.iterdir()) == sorted(p.name for p in streamed.out.iterdir())
    for name in ("config.json", "generation_config.json"):
        assert json.loads((loaded.out / name).read_text()) == json.loads((streamed.out / name).read_text()), name
    a, b = load_file(streamed.out / "model.safetensors"), load_file(loaded.out / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    mixtral = tiny_model("mixtral", num_local_experts=4, num_experts_per_tok=2)
    mixtral.save_pretrained(tmp_path / "mixtral")
    with pytest.raises(ExpertsStoredApart, match="stores each of mixtral's experts apart"):
        open_source(tmp_path / "mixtral")
    # a tensor missing: transformers starts it at random with only a warning (an attention projection) or fails
    # to fuse the experts (an expert's): refused in one line either way, nothing written
    weights = load_file(tmp_path / "mixtral" / "model.safetensors")
    for part, message in ((".q_proj.", r"do not match its config\.json: missing tensor .*q_proj"),
                          (".experts.", r"transformers could not load .*mixtral: .*conversion")):
        dropped = next(name for name in weights if part in name)
        save_file({k: v for k, v in weights.items() if k != dropped}, tmp_path / "mixtral" / "model.safetensors",
                  metadata={"format": "pt"})
        with pytest.raises(ValueError, match=message) as refused:
            convert(tmp_path / "mixtral", tmp_path / "mixtral-fam", options)
        assert "\n" not in str(refused.value) and not (tmp_path / "mixtral-fam").exists()
