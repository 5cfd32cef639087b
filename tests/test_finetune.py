"""`hf-fam finetune` and the loop behind it: one process in-process, two processes under accelerate launch, and
one-line errors for bad input."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import replace

import pytest
import torch
from conftest import assert_close, random_ids
from transformers import AutoTokenizer

from hf_fam.checkpoint_io.cards import CARD_MARK
from hf_fam.checkpoint_io.publish import check_pushable
from hf_fam.cli import main
from hf_fam.tiny import make_tiny_checkpoint
from hf_fam.training import text_check
from hf_fam.training.finetune import (
    DataOptions,
    FinetuneConfig,
    LoraOptions,
    ModelOptions,
    TrainOptions,
    adapter_digest,
    finetune,
)

SMALL = ["--block-size", "16", "--memory-segments", "1", "--fam-length", "4", "--lora-rank", "4"]


@pytest.fixture(scope="module")
def base_ckpt(tmp_path_factory):
    return make_tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny-llama", "llama")


@pytest.fixture
def text_files(tmp_path):
    folder = tmp_path / "docs"
    folder.mkdir()
    for i in range(4):
        (folder / f"{i}.txt").write_text(f"Story {i}. " + "Once upon a time there was a memory. " * 12)
    (tmp_path / "rows.jsonl").write_text("\n".join(json.dumps({"body": "some text " * 20}) for _ in range(3)))
    return folder, tmp_path / "rows.jsonl"


def _reset_accelerate():
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


def _adapter_equals_merged(out, rows: int):
    """The run's adapter, reloaded on its fam_base/, gives merged/'s logits (fp32, 1e-5) and not fam_base's alone.
    Returns (adapter, base)."""
    from peft import AutoPeftModelForCausalLM
    from transformers import AutoModelForCausalLM

    adapter = AutoPeftModelForCausalLM.from_pretrained(out, trust_remote_code=True).eval()
    merged = AutoModelForCausalLM.from_pretrained(out / "merged").eval()
    base = AutoModelForCausalLM.from_pretrained(out / "fam_base").eval()
    ids = random_ids(rows, 40, vocab=259)
    with torch.no_grad():
        got = adapter(input_ids=ids).logits
        assert_close(merged(ids).logits, got, atol=1e-5, msg="merged vs adapter")
        assert (base(ids).logits - got).abs().max() > 1e-4, "training changed nothing"
    return adapter, base


def test_finetune_on_text_saves_adapter_base_and_merged(base_ckpt, text_files, tmp_path):
    from transformers import AutoTokenizer

    from hf_fam.training.options import DEFAULT_MEMORY_START_TEXT

    out = tmp_path / "run"
    config = FinetuneConfig(
        model=ModelOptions(path=str(base_ckpt), block_size=16, memory_segments=1, fam_length=4),
        data=DataOptions(source="text", text_files=(str(text_files[0]),), seq_len=64),
        lora=LoraOptions(r=4),
        train=TrainOptions(output_dir=str(out), max_steps=3, batch_size=2, learning_rate=1e-2, log_every=1,
                           merge=True, gradient_checkpointing=True),
    )
    try:
        result = finetune(config)
    finally:
        _reset_accelerate()
    assert result.steps == 3 and result.world_size == 1 and torch.isfinite(torch.tensor(result.final_loss))
    assert {"adapter_config.json", "adapter_model.safetensors", "tokenizer.json", "train_log.jsonl",
            "train_summary.json", "finetune_config.json", "fam_base", "merged"} <= {p.name for p in out.iterdir()}
    log = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2, 3] and all("loss" in r for r in log)
    # one forward per step: its loss is logged under how its memory started, fresh or passed on by the recipe
    for r in log:
        assert r["loss"] == r["loss_passed_memory" if r["state_passed"] else "loss_fresh_memory"]
        assert r["loss_fresh_memory" if r["state_passed"] else "loss_passed_memory"] is None
    assert not log[0]["state_passed"]  # nothing to pass before the first forward
    summary = json.loads((out / "train_summary.json").read_text())
    final = (log[-1]["loss_fresh_memory"], log[-1]["loss_passed_memory"])  # the final loss, split the same way
    assert (summary["final_loss_fresh_memory"], summary["final_loss_passed_memory"]) == final
    assert (result.final_loss_fresh_memory, result.final_loss_passed_memory) == final
    adapter_config = json.loads((out / "adapter_config.json").read_text())
    assert adapter_config["base_model_name_or_path"] == str((out / "fam_base").resolve())
    assert "fam" in adapter_config["modules_to_save"]

    adapter, base = _adapter_equals_merged(out, rows=1)
    assert adapter_digest(adapter) == result.adapter_digests[0]
    assert "fine_tuned: true" in (out / "merged" / "README.md").read_text()
    check_pushable(out / "merged")  # `hf-fam push OUT/merged` would upload it: it verifies
    card = (out / "README.md").read_text()  # the adapter's card, not PEFT's template
    assert CARD_MARK in card and "LoRA adapter" in card and "[More Information Needed]" not in card
    assert f"`{(out / 'fam_base').resolve()}`" in card and "3 steps, text data in sequences of 64 tokens" in card
    trained_fam = adapter.base_model.model.fam.modules_to_save.default.fam_init
    assert (trained_fam - base.fam.fam_init).abs().max() > 0, "fam_init was not trained"
    assert {"input_layernorm", "post_attention_layernorm"} <= set(adapter_config["modules_to_save"])
    assert "norm" not in adapter_config["modules_to_save"]  # the final norm: not in the measured recipe
    # the BOS start of the converted memory: slot 0 keeps the sink, the others start as the start text's tokens
    tokenizer = AutoTokenizer.from_pretrained(out)
    embedding = base.get_input_embeddings().weight
    ids = tokenizer(DEFAULT_MEMORY_START_TEXT, add_special_tokens=False)["input_ids"]
    assert_close(base.fam.fam_init[0], embedding[base.config.bos_token_id], atol=0.0, msg="sink slot")
    assert_close(base.fam.fam_init[1:], embedding[[ids[i % len(ids)] for i in range(3)]], atol=0.0, msg="slots")


def test_memory_start_text_empty_keeps_the_bos_memory_and_a_chosen_memory_is_kept():
    from hf_fam.checkpoint_io.fam_init import training_fam_init

    class Tok:
        def __call__(self, text, add_special_tokens=False):
            return {"input_ids": [ord(c) % 10 for c in text]}

    embedding = torch.randn(10, 6)
    bos = embedding[1].expand(4, 6).clone()
    start = training_fam_init(bos, Tok(), embedding, "abc")
    assert_close(start[0], embedding[1], atol=0.0)
    assert_close(start[1:], embedding[[ord("a") % 10, ord("b") % 10, ord("c") % 10]], atol=0.0)
    assert training_fam_init(bos, Tok(), embedding, "") is None  # --memory-start-text '': the BOS memory stays
    assert training_fam_init(torch.randn(4, 6), Tok(), embedding, "abc") is None  # not the BOS start: kept
    assert training_fam_init(bos[:1], Tok(), embedding, "abc") is None  # F = 1: the sink slot only


def test_mix_trains_on_passkey_and_text_together(base_ckpt, text_files, tmp_path, capsys):
    """--data mix: every passkey example (answer-only labels) and packed text (every token labelled), shuffled."""
    from hf_fam.training.finetune import build_train_dataset, load_fam_model

    options = DataOptions(source="mix", text_files=(str(text_files[0]),), seq_len=64, passkey_form="synthetic",
                          passkey_examples=6, text_fraction=0.5)
    model, tokenizer, _ = load_fam_model(ModelOptions(path=str(base_ckpt), block_size=16, memory_segments=1,
                                                      fam_length=4))
    data = build_train_dataset(options, model, tokenizer)
    answer_only = [row for row in data["labels"] if -100 in row]
    assert len(data) == 12 and len(answer_only) == 6
    assert sum(row == ids for row, ids in zip(data["labels"], data["input_ids"])) == 6
    out = tmp_path / "mix"
    capsys.readouterr()
    try:
        code = main(["finetune", str(base_ckpt), "--output", str(out), *SMALL, "--steps", "2", "--data", "mix",
                     "--text-files", str(text_files[0]), "--seq-len", "64", "--passkey-form", "synthetic",
                     "--passkey-examples", "6", "--batch-size", "2"])
    finally:
        _reset_accelerate()
    printed = capsys.readouterr()
    assert code == 0, printed.err
    assert json.loads((out / "finetune_config.json").read_text())["data"]["source"] == "mix"
    # one log window of two steps, the second from the memory the first passed on: the final line splits its loss
    summary = json.loads((out / "train_summary.json").read_text())
    fresh, passed = summary["final_loss_fresh_memory"], summary["final_loss_passed_memory"]
    assert f"final loss {summary['final_loss']:.4f} (fresh memory {fresh:.4f}, passed memory {passed:.4f})" in \
        printed.out
    assert abs(summary["final_loss"] - (fresh + passed) / 2) < 1e-6


def _cli(argv, capsys):
    code = main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    return code, err[-1] if err else "", "\n".join(err)


def test_bad_input_gives_one_line_errors(base_ckpt, text_files, tmp_path, capsys):
    folder, rows = text_files
    out = str(tmp_path / "x")
    cases = [
        (["--lora-targets", "q_proj,qkv_proj"],
         "LoRA target module 'qkv_proj' not found in this llama model; its linear layers are named"),
        (["--data", "text", "--text-files", str(folder), "--seq-len", "100"],
         "seq_len 100 is not a multiple of the model's block_size 16"),
        (["--data", "text", "--text-files", str(rows), "--seq-len", "64"],
         "has no text column 'text' (its columns: body); name the column that holds the text with --text-column"),
        (["--data", "text", "--seq-len", "64"], "data source 'text' needs text files (--text-files FILE ...)"),
        (["--data", "mix", "--seq-len", "64"], "data source 'mix' needs text files (--text-files FILE ...)"),
        (["--data", "mix", "--text-files", str(folder), "--text-fraction", "1"],
         "text_fraction must be in (0, 1), got 1.0; use --data text or --data passkey for one source only"),
        (["--state-passing-prob", "2"], "state_passing_prob must be a probability in [0, 1], got 2.0"),
    ]
    try:
        for extra, needle in cases:
            code, last, everything = _cli(["finetune", str(base_ckpt), "--output", out, *SMALL, "--steps", "1", *extra],
                                          capsys)
            assert code == 2, everything
            assert last.startswith("hf-fam finetune: error: ") and needle in last, last
            assert "Traceback" not in everything
        code, last, _ = _cli(["finetune", str(tmp_path / "nowhere"), "--output", out], capsys)
        assert code == 2 and "no checkpoint at" in last
        full = ["finetune", str(base_ckpt), "--output", out, "--full", "--steps", "1"]
        for extra, needle in [
            (["--merge"], "--merge merges a LoRA adapter; a --full run saves the whole model already: drop --merge."),
            (["--lora-rank", "4", "--lora-init", "pissa"],
             "--lora-rank, --lora-init set LoRA, which a --full run does not use: drop them or --full."),
            (["--freeze-norms"], "--freeze-norms sets LoRA, which a --full run does not use: drop it or --full."),
        ]:
            code, last, everything = _cli([*full, *extra], capsys)
            assert code == 2 and last == f"hf-fam finetune: error: {needle}", everything
        assert not (tmp_path / "x").exists()
    finally:
        _reset_accelerate()


def test_text_data_that_cannot_load_is_refused_before_the_model_loads(tmp_path, monkeypatch):
    import importlib

    loop = importlib.import_module("hf_fam.training.finetune")  # the module (the package exports the function)
    monkeypatch.setattr(loop, "load_fam_model", lambda *args, **kwargs: pytest.fail("the model loaded first"))
    (tmp_path / "empty").mkdir()
    (tmp_path / "notes.doc").write_text("words")
    cases = [(tmp_path / "missing", "text data not found"), (tmp_path / "empty", "holds no text files"),
             (tmp_path / "notes.doc", "unknown file type '.doc'")]
    try:
        for path, needle in cases:
            config = FinetuneConfig(model=ModelOptions(path="some-model"),
                                    data=DataOptions(source="mix", text_files=(str(path),)),
                                    train=TrainOptions(output_dir=str(tmp_path / "out")))
            with pytest.raises((ValueError, FileNotFoundError), match=needle):
                finetune(config)
    finally:
        _reset_accelerate()
    assert not (tmp_path / "out").exists()


def test_fam_checkpoint_keeps_its_settings(base_ckpt, tmp_path, capsys):
    from transformers import AutoModelForCausalLM

    import hf_fam

    fam = hf_fam.FAMForCausalLM.from_base_model(AutoModelForCausalLM.from_pretrained(base_ckpt), block_size=16,
                                                memory_segments=1, fam_length=4)
    fam.save_pretrained(tmp_path / "fam")
    code, last, _ = _cli(["finetune", str(tmp_path / "fam"), "--output", str(tmp_path / "x"), "--block-size", "32"],
                         capsys)
    assert code == 2
    assert "is a FAM checkpoint with block_size 16; --block-size 32 only applies to base checkpoints" in last

    out = tmp_path / "run"
    try:
        code, last, everything = _cli(["finetune", str(tmp_path / "fam"), "--output", str(out), "--lora-rank", "4",
                                       "--passkey-form", "synthetic", "--seq-len", "48", "--passkey-examples", "4",
                                       "--steps", "2", "--batch-size", "2"], capsys)
    finally:
        _reset_accelerate()
    assert code == 0, everything
    adapter_config = json.loads((out / "adapter_config.json").read_text())
    assert adapter_config["base_model_name_or_path"] == str((tmp_path / "fam").resolve())
    assert not (out / "fam_base").exists()


def test_full_trains_every_weight_and_saves_the_whole_model(base_ckpt, tmp_path):
    """LoraOptions(full=True) / --full: every weight and fam_init trained under the same recipe; the output is a FAM
    checkpoint (no adapter, no fam_base) that loads to the trained model exactly."""
    from transformers import AutoModelForCausalLM

    out = tmp_path / "full"
    config = FinetuneConfig(
        model=ModelOptions(path=str(base_ckpt), block_size=16, memory_segments=1, fam_length=4),
        data=DataOptions(passkey_form="synthetic", seq_len=48, passkey_examples=8),
        lora=LoraOptions(full=True),
        train=TrainOptions(output_dir=str(out), max_steps=2, batch_size=2, learning_rate=1e-3, log_every=1),
    )
    try:
        result = finetune(config)
    finally:
        _reset_accelerate()
    names = {p.name for p in out.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "train_log.jsonl", "train_summary.json"} <= names
    assert not {"adapter_config.json", "fam_base", "merged"} & names and result.fam_base_dir is None
    card = (out / "README.md").read_text()
    assert "fine_tuned: true" in card and "\n# full\n" in card  # titled by the output, not the staging folder
    check_pushable(out)
    summary = json.loads((out / "train_summary.json").read_text())
    assert summary["trained"] == "every weight" and summary["adapter_digests"] == result.adapter_digests

    saved = AutoModelForCausalLM.from_pretrained(out).eval()
    assert saved.config.fam_update == "paper"  # the zero-shot start switched for training, as for LoRA
    assert adapter_digest(saved) == result.adapter_digests[0]
    base = _converted_like_the_run(base_ckpt)
    ids = random_ids(2, 40, vocab=259)
    with torch.no_grad():
        got = saved(ids).logits
        assert_close(result.model.eval()(ids).logits, got, atol=0.0, msg="saved vs trained")
        assert (base(ids).logits - got).abs().max() > 1e-4, "training changed nothing"
    moved = {name for name, w in saved.named_parameters() if (w - dict(base.named_parameters())[name]).abs().max() > 0}
    assert "fam.fam_init" in moved and "model.layers.0.self_attn.q_proj.weight" in moved
    assert "model.layers.1.mlp.down_proj.weight" in moved and "model.embed_tokens.weight" in moved


def test_full_with_frozen_embeddings_trains_everything_else(base_ckpt, tmp_path, capsys):
    from transformers import AutoModelForCausalLM

    out = tmp_path / "frozen"
    config = FinetuneConfig(
        model=ModelOptions(path=str(base_ckpt), block_size=16, memory_segments=1, fam_length=4),
        data=DataOptions(passkey_form="synthetic", seq_len=48, passkey_examples=8),
        lora=LoraOptions(full=True, train_embeddings=False),
        train=TrainOptions(output_dir=str(out), max_steps=2, batch_size=2, learning_rate=1e-3, log_every=1),
    )
    try:
        finetune(config)
    finally:
        _reset_accelerate()
    saved = AutoModelForCausalLM.from_pretrained(out).eval()
    base = dict(_converted_like_the_run(base_ckpt).named_parameters())
    moved = {name for name, w in saved.named_parameters() if (w - base[name]).abs().max() > 0}
    assert "model.embed_tokens.weight" not in moved
    assert {"fam.fam_init", "model.layers.0.self_attn.q_proj.weight", "lm_head.weight"} <= moved  # untied here
    summary = json.loads((out / "train_summary.json").read_text())
    assert summary["trained"] == "every weight but the token embeddings"
    with pytest.raises(ValueError, match="--freeze-embeddings goes with --full"):
        FinetuneConfig(model=config.model, train=config.train, lora=LoraOptions(train_embeddings=False))


def _converted_like_the_run(base_ckpt):
    """The tiny base converted as the run converts it (C=16, M=1, F=4, the paper's update, the start text's
    memory), so weights compare name by name."""
    from transformers import AutoTokenizer

    from hf_fam.training.finetune import load_fam_model
    from hf_fam.training.training_base import content_slots

    model, tokenizer, _ = load_fam_model(ModelOptions(path=str(base_ckpt), block_size=16, memory_segments=1,
                                                      fam_length=4))
    model.config.fam_update = "paper"
    content_slots(model, AutoTokenizer.from_pretrained(base_ckpt), ModelOptions(path="x").memory_start_text)
    return model.eval()


def test_a_pissa_start_saves_an_adapter_for_the_unchanged_base(base_ckpt, tmp_path, capsys):
    """--lora-init pissa: the run trains from the weights' top singular vectors, and what it saves applies to the
    unchanged base weights in fam_base/ (PEFT's conversion, rank doubled, with fam_init and the norms); merged/
    equals the adapter on fam_base; nothing of the start is left in the output."""
    from safetensors.torch import load_file

    out = tmp_path / "run"
    try:
        code, _, everything = _cli(["finetune", str(base_ckpt), "--output", str(out), *SMALL, "--lora-init", "pissa",
                                    "--seq-len", "48", "--passkey-form", "synthetic", "--passkey-examples", "8",
                                    "--steps", "3", "--batch-size", "2", "--lr", "1e-2", "--merge"], capsys)
    finally:
        _reset_accelerate()
    assert code == 0, everything
    assert not (out / "lora_start").exists()
    adapter_config = json.loads((out / "adapter_config.json").read_text())
    assert (adapter_config["r"], adapter_config["lora_alpha"], adapter_config["init_lora_weights"]) == (8, 8, True)
    assert adapter_config["base_model_name_or_path"] == str((out / "fam_base").resolve())
    saved = load_file(out / "adapter_model.safetensors")
    assert any(name.endswith("fam.fam_init") for name in saved) and any("input_layernorm" in n for n in saved)
    original = load_file(base_ckpt / "model.safetensors")
    fam_base = load_file(out / "fam_base" / "model.safetensors")
    for name, weight in original.items():  # the base weights the adapter applies to are the checkpoint's own
        assert torch.equal(fam_base[name], weight), name

    _adapter_equals_merged(out, rows=2)


def test_an_existing_output_is_refused_and_replaced_whole_with_force(base_ckpt, tmp_path, capsys):
    """`-o EXISTING` used to replace the adapter and leave the old merged/ beside it. Now: refused in one line;
    with --force the old folder is swapped for the new run's once it is complete (no stale merged/, no old
    log lines); a failed run leaves neither its own files nor a temporary folder."""
    out = tmp_path / "run"
    out.mkdir()
    (out / "merged").mkdir()
    (out / "merged" / "config.json").write_text("{}")
    (out / "train_log.jsonl").write_text('{"step": 999}\n')
    run = ["finetune", str(base_ckpt), "--output", str(out), *SMALL, "--seq-len", "48", "--passkey-form",
           "synthetic", "--passkey-examples", "4", "--steps", "1", "--batch-size", "2"]
    try:
        code, last, everything = _cli(run, capsys)
        assert code == 2 and "Traceback" not in everything
        assert last == (f"hf-fam finetune: error: {out} already exists and is not empty (a previous run?); pass "
                        "--force to replace it once this run is done, or choose another --output")
        assert (out / "merged" / "config.json").read_text() == "{}"

        code, last, everything = _cli([*run, "--force", "--lora-targets", "no_such_proj"], capsys)
        assert code == 2 and "no_such_proj" in last
        assert sorted(p.name for p in out.iterdir()) == ["merged", "train_log.jsonl"]  # untouched
        assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]  # no temporary folder left

        code, last, everything = _cli([*run, "--force"], capsys)
        assert code == 0, everything
    finally:
        _reset_accelerate()
    assert not (out / "merged").exists()
    assert [json.loads(line)["step"] for line in (out / "train_log.jsonl").read_text().splitlines()] == [1]
    assert (out / "adapter_config.json").exists() and (out / "fam_base" / "config.json").exists()
    adapter_config = json.loads((out / "adapter_config.json").read_text())
    assert adapter_config["base_model_name_or_path"] == str((out / "fam_base").resolve())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]
    assert ".fam-tmp" not in (out / "README.md").read_text()  # PEFT's card names no temporary folder


def test_help_explains_every_option(capsys):
    with pytest.raises(SystemExit):
        main(["finetune", "--help"])
    text = capsys.readouterr().out
    for option in ("--state-passing-prob", "--position-offset-prob", "--lora-targets", "--text-column", "--merge",
                   "--gradient-checkpointing", "--passkey-form", "accelerate launch"):
        assert option in text


@pytest.mark.parametrize("trained", ["lora", "full", "qlora"])
def test_two_processes_under_accelerate_launch_end_with_the_same_adapter(base_ckpt, tmp_path, trained):
    """Two CPU processes over gloo (`accelerate launch --multi_gpu` with `--cpu`: the plain `--cpu` launch starts
    one process), LoRA, every weight (--full) and QLoRA (--quantize 4bit, each process loading its own quantized
    weights). About 15-25 s each here, most of it starting the processes."""
    out = tmp_path / "ddp"
    what = {"lora": SMALL, "full": [*SMALL[:-2], "--full"], "qlora": [*SMALL, "--quantize", "4bit"]}[trained]
    if trained == "qlora":
        pytest.importorskip("bitsandbytes")
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "hf_fam.cli",
           "finetune", str(base_ckpt), "--output", str(out), *what, "--seq-len", "64", "--passkey-form", "synthetic",
           "--passkey-examples", "16", "--steps", "4", "--batch-size", "2", "--lr", "1e-2", "--log-every", "2",
           "--state-passing-prob", "0.8", "--cpu"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    result = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=240)
    assert result.returncode == 0, result.stderr[-4000:]
    summary = json.loads((out / "train_summary.json").read_text())
    assert summary["world_size"] == 2 and summary["steps"] == 4
    digests = summary["adapter_digests"]
    assert len(digests) == 2 and digests[0] == digests[1], digests

    from peft import AutoPeftModelForCausalLM
    from transformers import AutoModelForCausalLM

    if trained == "full":
        assert adapter_digest(AutoModelForCausalLM.from_pretrained(out)) == digests[0]
        assert summary["trained"] == "every weight"
        return
    saved = AutoPeftModelForCausalLM.from_pretrained(out)
    assert adapter_digest(saved) == digests[0]
    lora_b = [p for n, p in saved.named_parameters() if "lora_B" in n]
    assert any(p.abs().max() > 0 for p in lora_b), "no training happened"


def test_the_loss_on_held_out_sequences_is_measured_before_and_after(base_ckpt, tmp_path, monkeypatch):
    """`--heldout N` keeps N sequences out of training and measures the loss on them for the model as given (the
    base converted on the fly: the zero-shot start), at the training start (fam_base: the paper's update, content
    slots) and at the end (the adapter): each figure is the one a separate evaluation of that model gives."""
    from hf_fam.runtime.loading import FAMOverrides
    from hf_fam.runtime.loading import load_fam_model as load
    from hf_fam.training.data import FAMDataCollator, build_train_dataset
    from hf_fam.training.heldout import heldout_loss, split_heldout

    out = tmp_path / "run"
    model_options = ModelOptions(path=str(base_ckpt), block_size=8, memory_segments=1, fam_length=4)
    data = DataOptions(passkey_form="synthetic", seq_len=24, passkey_examples=40, heldout=4)
    config = FinetuneConfig(model=model_options, data=data, lora=LoraOptions(r=4),
                            train=TrainOptions(output_dir=str(out), max_steps=3, batch_size=2, learning_rate=1e-2))
    try:
        result = finetune(config)
    finally:
        _reset_accelerate()
    summary = json.loads((out / "train_summary.json").read_text())
    assert summary["heldout_sequences"] == result.heldout_sequences == 4
    assert summary["heldout_loss"] == result.heldout_losses
    assert set(result.heldout_losses) == {"given", "start", "final"}

    given, _ = load(str(base_ckpt), overrides=FAMOverrides(8, 1, 4))  # as hf-fam eval reads the base with C, M, F
    dataset, held = split_heldout(build_train_dataset(data, given, None), 4, seed=0)
    assert len(dataset) == 36 and not {tuple(x) for x in held["input_ids"]} & {tuple(x) for x in dataset["input_ids"]}
    collator = FAMDataCollator(0)
    expected = {"given": given, "start": load(str(out / "fam_base"))[0],
                "final": load(str(out), adapters=True)[0]}  # the adapter merged into fam_base
    for name, model in expected.items():
        measured = heldout_loss(model, held, collator, 2, "cpu")
        assert abs(measured - summary["heldout_loss"][name]) <= 1e-5 * max(1.0, measured), name
    assert len(set(summary["heldout_loss"].values())) == 3  # three different models
    # and plain text within one block, by the model as given and the trained one (training/text_check.py)
    ids = text_check.text_ids(AutoTokenizer.from_pretrained(base_ckpt), 8)
    assert ids.shape == (1, 8)
    for name in ("given", "start", "final"):
        measured = text_check.text_loss(expected[name], ids, "cpu")
        assert abs(measured - summary["text_loss"][name]) <= 1e-5 * max(1.0, measured), name
    assert result.text_line.startswith("text within one block (Python's documentation, 8 tokens): loss ")

    # a model already in the training start (the run's fam_base) is not measured as given: two passes, not three
    import importlib

    finetune_module = importlib.import_module("hf_fam.training.finetune")  # the package exports the function

    passes = []
    measured_loss = finetune_module.heldout_loss

    def counted(*args, **kwargs):
        passes.append(kwargs.get("progress"))
        return measured_loss(*args, **kwargs)

    again = tmp_path / "again"
    monkeypatch.setattr(finetune_module, "heldout_loss", counted)
    try:
        rerun = finetune(replace(config, model=ModelOptions(path=str(out / "fam_base")),
                                 train=replace(config.train, output_dir=str(again))))
    finally:
        _reset_accelerate()
    assert set(rerun.heldout_losses) == {"start", "final"} and len(passes) == 2, passes

    none = tmp_path / "none"
    try:
        finetune(replace(config, data=replace(data, heldout=0), train=replace(config.train, output_dir=str(none))))
    finally:
        _reset_accelerate()
    summary = json.loads((none / "train_summary.json").read_text())
    assert summary["heldout_sequences"] == 0 and summary["heldout_loss"] == {}


def test_a_run_that_leaves_plain_text_much_worse_warns(caplog):
    """Perplexity more than doubled on text within one block: the run may have cost the model its language, which
    a held-out loss on passkey answers does not show."""
    import logging

    with caplog.at_level(logging.INFO, logger="hf_fam.training"):
        text_check.check(2.8966, 4.5785, 256, start=4.5639)  # SmolLM2 at the paper's settings, 4 passkey steps
        text_check.check(2.8966, 2.8966 + 0.69, 256)  # just under double
    assert [r.levelname for r in caplog.records] == ["WARNING", "INFO"]
    assert "loss 2.8966 as given, 4.5639 at the training start -> 4.5785: perplexity 5.4 times the model as given's" \
        in caplog.records[0].getMessage()
    assert text_check.check(None, 3.0, 256) == ""


def test_a_run_that_leaves_the_held_out_loss_above_the_model_as_given_warns(caplog):
    """Above the model as given (or above the start, when that is the model as given): the trained model is worse
    on sequences it did not see, which the training loss does not show."""
    import logging

    from hf_fam.training.heldout import worse_than

    with caplog.at_level(logging.WARNING, logger="hf_fam.training"):
        assert worse_than({"given": 0.7342, "start": 0.7811, "final": 0.7389})  # SmolLM2's 6-step run
        assert not worse_than({"given": 0.74, "start": 0.78, "final": 0.73})
        assert worse_than({"start": 1.0, "final": 1.2})  # a start that is the model as given
        assert not worse_than({"start": 1.0, "final": 0.9}) and not worse_than({})
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 2 and "(0.7389 > 0.7342)" in warnings[0] and "(1.2000 > 1.0000)" in warnings[1]
