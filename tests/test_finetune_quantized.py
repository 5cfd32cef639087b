"""`hf-fam finetune --quantize 4bit|8bit` (QLoRA from the command line), and `--quantize` for generate and eval.

- The run trains on quantized weights, and its adapter applies to the unquantized checkpoint: OUT/fam_base is
  written from the source's files, tensor for tensor what a full-precision run saves (a base converted on the
  fly), or the FAM checkpoint's own tensors byte for byte with the training start's fam_init and update.
- The adapter, loaded on a fresh quantized load of fam_base, gives the trained model's logits; `--merge` merges it
  into the unquantized base (= the adapter unmerged on it).
- bitsandbytes' CPU backend repacks 4-bit weights for inference at an eval forward, after which they pass no
  gradients; the run's measurements before training must not do that (`hf_fam.runtime.quantize.keep_trainable`).
"""

from __future__ import annotations

import hashlib
import json

import pytest
import torch
from conftest import assert_close, random_ids
from safetensors.torch import load_file

from hf_fam.cli import main
from hf_fam.tiny import make_tiny_checkpoint
from hf_fam.training.finetune import DataOptions, FinetuneConfig, LoraOptions, ModelOptions, TrainOptions, finetune

bnb = pytest.importorskip("bitsandbytes")
try:
    bnb.functional.quantize_4bit(torch.ones(64, 64))
except Exception as error:  # no backend for this machine
    pytest.skip(f"bitsandbytes cannot quantize here: {error}", allow_module_level=True)

SETTINGS = dict(block_size=16, memory_segments=1, fam_length=4)
SMALL = ["--block-size", "16", "--memory-segments", "1", "--fam-length", "4", "--lora-rank", "4"]
PASSKEY = ["--passkey-form", "synthetic", "--seq-len", "48", "--passkey-examples", "4", "--batch-size", "2"]


@pytest.fixture(scope="module")
def base_ckpt(tmp_path_factory):
    return make_tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny-llama", "llama")


@pytest.fixture(autouse=True)
def _reset_accelerate():
    yield
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


def _run(path, out, quantize, merge=False, **model):
    config = FinetuneConfig(
        model=ModelOptions(path=str(path), quantize=quantize, **model),
        data=DataOptions(source="passkey", passkey_form="synthetic", seq_len=48, passkey_examples=4),
        lora=LoraOptions(r=4),
        train=TrainOptions(output_dir=str(out), max_steps=2, batch_size=2, learning_rate=1e-2, merge=merge),
    )
    return finetune(config)


def _load(path, quantize=None):
    from hf_fam.runtime.loading import load_fam_model

    return load_fam_model(str(path), dtype="float32", quantize=quantize)[0]


def _fam_keys(folder):
    config = json.loads((folder / "config.json").read_text())
    assert "quantization_config" not in config and "quantization_config" not in config["base_config"]
    return {k: config[k] for k in ("block_size", "memory_segments", "fam_length", "fam_layers", "fam_update")}


def test_a_quantized_run_saves_the_unquantized_base_and_an_adapter_that_reloads(base_ckpt, tmp_path):
    from peft import PeftModel

    from hf_fam.runtime.quantize import keep_trainable

    result = _run(base_ckpt, tmp_path / "q", "4bit", **SETTINGS)
    _run(base_ckpt, tmp_path / "plain", None, **SETTINGS)
    # fam_base: what the full-precision run saves, tensor for tensor (the training start's fam_init included)
    got, expected = load_file(tmp_path / "q" / "fam_base" / "model.safetensors"), load_file(
        tmp_path / "plain" / "fam_base" / "model.safetensors")
    assert got.keys() == expected.keys()
    for name in expected:
        assert torch.equal(got[name], expected[name]), name
    assert _fam_keys(tmp_path / "q" / "fam_base") == _fam_keys(tmp_path / "plain" / "fam_base")
    assert _fam_keys(tmp_path / "q" / "fam_base")["fam_update"] == "paper"
    summary = json.loads((tmp_path / "q" / "train_summary.json").read_text())
    assert summary["quantized"] == "4bit" and summary["base_model"] == str((tmp_path / "q" / "fam_base").resolve())
    assert "`hf-fam finetune`, 2 steps on the base loaded in 4bit (QLoRA), passkey data" in (
        tmp_path / "q" / "README.md").read_text()
    assert "QLoRA" not in (tmp_path / "plain" / "README.md").read_text()

    # the adapter on a fresh 4-bit load of fam_base = the model the run trained; its fam_init was trained
    trained = result.model.eval()
    assert type(trained.base_model.model.model.layers[0].self_attn.q_proj.base_layer).__name__ == "Linear4bit"
    again = PeftModel.from_pretrained(_load(tmp_path / "q" / "fam_base", "4bit"), tmp_path / "q").eval()
    keep_trainable(again)  # the kernel the run trained with: bitsandbytes' CPU inference kernel differs by ~3e-3
    ids = random_ids(2, 40, vocab=259)
    with torch.no_grad():
        assert_close(again(input_ids=ids).logits, trained(input_ids=ids).logits, atol=1e-5)
    fam_init = again.base_model.model.fam.modules_to_save.default.fam_init
    assert (fam_init - got["fam.fam_init"]).abs().max() > 0, "fam_init was not trained"
    # through the 4-bit layers: the layers were not repacked into the kernel that passes no gradients
    assert not any(getattr(getattr(getattr(m, "weight", None), "quant_state", None), "packing_format_for_cpu", False)
                   for m in trained.modules())


def test_merge_after_a_quantized_run_merges_into_the_unquantized_base(base_ckpt, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    _run(base_ckpt, tmp_path / "q", "8bit", merge=True, **SETTINGS)
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "q" / "merged").eval()
    assert "quantization_config" not in json.loads((tmp_path / "q" / "merged" / "config.json").read_text())
    unmerged = PeftModel.from_pretrained(_load(tmp_path / "q" / "fam_base"), tmp_path / "q").eval()
    ids = random_ids(1, 40, vocab=259)
    with torch.no_grad():
        assert_close(merged(ids).logits, unmerged(input_ids=ids).logits, atol=1e-5)


def _digest(folder):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir()) if p.is_file()}


def _tensors(folder):
    return {name: t for path in sorted(folder.glob("*.safetensors")) for name, t in load_file(path).items()}


@pytest.mark.parametrize("layout", ["one file", "shards"])
def test_a_fam_checkpoint_in_the_zero_shot_start_is_copied_with_the_training_start(base_ckpt, tmp_path, capsys,
                                                                                   layout):
    from hf_fam.checkpoint_io.convert import ConvertOptions, convert

    fam = tmp_path / "fam"
    convert(base_ckpt, fam, ConvertOptions(**SETTINGS, progress=False))  # fam_update "sink", a BOS memory
    if layout == "shards":
        from transformers import AutoModelForCausalLM, AutoTokenizer

        AutoModelForCausalLM.from_pretrained(fam).save_pretrained(tmp_path / "sharded", max_shard_size="100KB")
        AutoTokenizer.from_pretrained(fam).save_pretrained(tmp_path / "sharded")  # for the content slots
        fam = tmp_path / "sharded"
        assert len(list(fam.glob("*.safetensors"))) > 2
    before = _digest(fam)
    out = tmp_path / "run"
    code = main(["finetune", str(fam), "--output", str(out), "--lora-rank", "4", *PASSKEY, "--steps", "1",
                 "--quantize", "4bit"])
    assert code == 0, capsys.readouterr().err
    assert _digest(fam) == before  # the source is never modified
    assert json.loads((out / "adapter_config.json").read_text())["base_model_name_or_path"] == str(
        (out / "fam_base").resolve())
    source, copy = _tensors(fam), _tensors(out / "fam_base")
    assert sorted(p.name for p in fam.glob("*.safetensors")) == sorted(
        p.name for p in (out / "fam_base").glob("*.safetensors"))
    assert source.keys() == copy.keys()
    for name in source:  # every tensor the source's, but the memory: the training start's content slots
        assert torch.equal(copy[name], source[name]) == (name != "fam.fam_init"), name
    # the training start: what a full-precision run on the same checkpoint saves
    _run(fam, tmp_path / "plain", None)
    assert torch.equal(copy["fam.fam_init"], load_file(tmp_path / "plain" / "fam_base" / "model.safetensors")
                       ["fam.fam_init"])
    assert _fam_keys(out / "fam_base") == {**_fam_keys(fam), "fam_update": "paper"}

    # trained further, still on 4-bit weights: the adapter's base is the same fam_base
    more = tmp_path / "more"
    code = main(["finetune", str(out), "--output", str(more), *PASSKEY, "--steps", "1", "--quantize", "4bit"])
    assert code == 0, capsys.readouterr().err
    assert json.loads((more / "adapter_config.json").read_text())["base_model_name_or_path"] == str(
        (out / "fam_base").resolve())
    # a checkpoint already in the training start (that fam_base) is the new adapter's base itself
    again = tmp_path / "again"
    code = main(["finetune", str(out / "fam_base"), "--output", str(again), "--lora-rank", "4", *PASSKEY, "--steps",
                 "1", "--quantize", "8bit"])
    assert code == 0, capsys.readouterr().err
    assert not (again / "fam_base").exists()
    assert json.loads((again / "adapter_config.json").read_text())["base_model_name_or_path"] == str(
        (out / "fam_base").resolve())


def test_keep_trainable_keeps_the_4bit_layers_passing_gradients(base_ckpt, tmp_path):
    """bitsandbytes' CPU backend repacks 4-bit weights at a forward in eval mode (on CPUs with AVX512-BF16), after
    which the layers pass no gradient back: the gradient of fam_init after an eval forward must be the one
    without it."""
    from hf_fam.checkpoint_io.convert import ConvertOptions, convert
    from hf_fam.runtime.quantize import keep_trainable
    from hf_fam.training.lora import unwrap_fam_model

    fam = tmp_path / "fam"

    convert(base_ckpt, fam, ConvertOptions(**SETTINGS, fam_update="paper", progress=False))
    ids = random_ids(1, 40, vocab=259)

    def fam_init_grad(model, eval_first: bool):
        if eval_first:
            with torch.no_grad():
                model.eval()(ids)
        model.train()
        model(ids, labels=ids).loss.backward()
        return unwrap_fam_model(model).fam.fam_init.grad

    def fresh():
        model = _load(fam, "4bit")
        model.fam.fam_init.requires_grad_(True)
        return model

    expected = fam_init_grad(fresh(), eval_first=False)
    assert expected.abs().max() > 0
    model = fresh()
    keep_trainable(model)
    assert_close(fam_init_grad(model, eval_first=True), expected, atol=1e-6)

    repacking = fresh()
    if not any(getattr(m, "support_avx512bf16_for_cpu", False) for m in repacking.modules()):
        pytest.skip("this CPU has no AVX512-BF16: bitsandbytes does not repack here")
    # a training forward through repacked layers is refused (it would lose fam_init's gradient), and so is
    # keep_trainable, too late
    with pytest.raises(ValueError, match="repacked for bitsandbytes' CPU inference kernel by a forward in eval mode"):
        fam_init_grad(repacking, eval_first=True)
    with pytest.raises(ValueError, match="call hf_fam.runtime.quantize.keep_trainable"):
        keep_trainable(repacking)
    with torch.no_grad():  # reading is unaffected
        repacking.eval()(ids)


def _cli(argv, capsys):
    code = main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    return code, err[-1] if err else "", "\n".join(err)


def test_what_a_quantized_run_cannot_do_is_refused_in_one_line(base_ckpt, tmp_path, capsys, monkeypatch):
    out = str(tmp_path / "x")
    start = ["finetune", str(base_ckpt), "--output", out, *SMALL, "--steps", "1", "--quantize", "4bit"]
    for extra, needle in [
        (["--full"], "--full trains every weight, and 4bit weights cannot be trained: drop --quantize (LoRA beside "
                     "quantized weights is QLoRA) or --full."),
        (["--lora-init", "pissa"], "--lora-init pissa moves part of each base weight into LoRA, which 4bit weights "
                                   "cannot give back exactly: drop --quantize or --lora-init."),
    ]:
        code, last, everything = _cli([*start, *extra], capsys)
        assert code == 2 and last == f"hf-fam finetune: error: {needle}", everything
    monkeypatch.setitem(__import__("sys").modules, "bitsandbytes", None)  # as if not installed
    for argv in (start, ["generate", str(base_ckpt), "--prompt", "hi", "--quantize", "8bit", *SMALL[:6]]):
        code, last, everything = _cli(argv, capsys)
        assert code == 2 and "loads the weights with bitsandbytes, which is not installed: pip install bitsandbytes" \
            in last and "Traceback" not in everything, everything
    assert not (tmp_path / "x").exists()


def test_generate_and_eval_read_with_quantized_weights(base_ckpt, tmp_path, capsys):
    """--quantize for generate and eval: an adapter stays unmerged on its quantized base; the perplexity is the
    quantized model's."""
    import math

    from hf_fam.runtime.loading import load_fam_model

    _run(base_ckpt, tmp_path / "q", "4bit", **SETTINGS)
    text = tmp_path / "text.txt"
    text.write_text(" ".join(f"word{i % 37} and more {i}" for i in range(40)))
    code = main(["generate", str(tmp_path / "q"), "--prompt", "word1 and more", "--max-new-tokens", "4",
                 "--quantize", "4bit", "--no-progress"])
    assert code == 0, capsys.readouterr().err
    out = tmp_path / "ppl.json"
    code = main(["eval", str(tmp_path / "q"), "--task", "perplexity", "--text-file", str(text), "--quantize", "4bit",
                 "--dtype", "float32", "--out", str(out), "--no-plot"])
    assert code == 0, capsys.readouterr().err
    model, tokenizer = load_fam_model(str(tmp_path / "q"), dtype="float32", quantize="4bit", adapters=True)
    assert type(model).__name__ == "PeftModelForCausalLM"  # unmerged: merging would round it into 4 bits
    ids = torch.tensor([tokenizer.bos_token_id] + tokenizer(text.read_text(), add_special_tokens=False)["input_ids"])
    with torch.no_grad():
        logits = model(input_ids=ids[None]).logits[0, :-1]
    expected = math.exp(torch.nn.functional.cross_entropy(logits, ids[1:]).item())
    assert math.isclose(json.loads(out.read_text())["perplexity"], expected, rel_tol=1e-4)
