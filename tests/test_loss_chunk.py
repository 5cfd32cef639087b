"""`fam_loss_chunk`: the causal-LM loss summed chunk by chunk, with no (tokens x vocabulary) logits kept.

Equal to the family's own loss and gradients (fp32 <= 1e-5) on every family, through PEFT and a patched model,
with ignored labels, `num_items_in_batch` and `shift_labels`; it keeps far less for backward; it refuses what it
would silently change.
"""

from __future__ import annotations

import pytest
import torch
from conftest import assert_close, random_ids
from peft import get_peft_model
from test_families import SPECS, build

import hf_fam
from hf_fam.training import fam_lora_config

C, M, F = 8, 1, 4


def fam_model(name: str):
    base = build(name)
    return hf_fam.FAMForCausalLM.from_base_model(base, block_size=C, memory_segments=M, fam_length=F).train()


def loss_and_grads(model, **kwargs):
    params = [p for p in model.parameters() if p.requires_grad]
    loss = model(**kwargs).loss
    grads = torch.autograd.grad(loss, params, allow_unused=True)  # PEFT keeps the saved modules' originals
    return loss.detach(), [torch.zeros_like(p) if g is None else g for p, g in zip(params, grads)]


def labels_with_ignored(ids: torch.Tensor) -> torch.Tensor:
    labels = ids.clone()
    labels[0, :11] = -100  # a prompt not counted
    labels[1, -5:] = -100
    return labels


@pytest.mark.parametrize("name", list(SPECS))
def test_equals_the_family_loss_and_gradients(name):
    model = fam_model(name)
    ids = random_ids(2, 45, seed=3)  # 45 tokens: chunks of 16 leave a remainder, blocks of 8 too
    labels = labels_with_ignored(ids)
    loss, grads = loss_and_grads(model, input_ids=ids, labels=labels)
    chunked, chunked_grads = loss_and_grads(model, input_ids=ids, labels=labels, fam_loss_chunk=16)
    assert_close(chunked, loss, msg=name)
    for g, h in zip(chunked_grads, grads):
        assert_close(g, h, msg=name)


def test_num_items_in_batch_and_shift_labels():
    model = fam_model("llama-tied")
    ids = random_ids(2, 30, seed=4)
    labels = labels_with_ignored(ids)
    n = torch.tensor(77)
    for kwargs in ({"labels": labels, "num_items_in_batch": n},
                   {"labels": labels, "shift_labels": torch.roll(labels, 3, dims=1)}):
        expected = model(input_ids=ids, **kwargs).loss
        assert_close(model(input_ids=ids, fam_loss_chunk=7, **kwargs).loss, expected, msg=str(list(kwargs)))


def test_through_peft_lora_and_a_patched_model():
    ids = random_ids(2, 40, seed=5)
    peft_model = get_peft_model(fam_model("llama-untied"), fam_lora_config(fam_model("llama-untied"), r=4))
    for p in peft_model.parameters():  # B != 0, so that LoRA changes the loss
        if p.requires_grad:
            torch.nn.init.normal_(p, std=0.02)
    loss, grads = loss_and_grads(peft_model, input_ids=ids, labels=ids)
    chunked, chunked_grads = loss_and_grads(peft_model, input_ids=ids, labels=ids, fam_loss_chunk=9)
    assert_close(chunked, loss)
    for g, h in zip(chunked_grads, grads):
        assert_close(g, h)

    patched = hf_fam.patch(build("qwen3"), block_size=C, memory_segments=M, fam_length=F).train()
    loss, grads = loss_and_grads(patched, input_ids=ids, labels=ids)
    chunked, chunked_grads = loss_and_grads(patched, input_ids=ids, labels=ids, fam_loss_chunk=16)
    assert_close(chunked, loss)
    for g, h in zip(chunked_grads, grads):
        assert_close(g, h)


def test_outputs_keep_no_logits_and_put_the_loss_first():
    model = fam_model("llama-tied")
    ids = random_ids(1, 20)
    out = model(input_ids=ids, labels=ids, fam_loss_chunk=8)
    assert out.logits.shape == (1, 0, model.config.vocab_size)
    assert out[0] is out.loss and out["loss"] is out.loss and out.fam_state is not None
    # without labels there is no loss to chunk: the forward is the plain one
    assert_close(model(input_ids=ids, fam_loss_chunk=8).logits, model(input_ids=ids).logits)
    last = model(input_ids=ids, fam_loss_chunk=8, logits_to_keep=1).logits  # as generate() calls it
    assert_close(last, model(input_ids=ids).logits[:, -1:])


def test_backward_keeps_no_full_logits():
    """What autograd saves for backward: without chunking, logits-shaped tensors (..., vocabulary) over all 64
    tokens; with chunks of 16, none over more than 16 tokens."""
    model = fam_model("llama-tied")
    ids = random_ids(1, 64)
    vocab = model.config.vocab_size
    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}

    def logits_rows_saved(**kwargs) -> int:
        rows = [0]

        def pack(t):
            if t.dim() >= 2 and t.shape[-1] == vocab and t.untyped_storage().data_ptr() not in weights:
                rows[0] = max(rows[0], t.numel() // vocab)
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            model(input_ids=ids, labels=ids, **kwargs).loss.backward()
        return rows[0]

    assert logits_rows_saved() == 64
    assert logits_rows_saved(fam_loss_chunk=16) == 0  # a chunk's logits are made again in backward


def test_refuses_what_it_would_change():
    model = fam_model("llama-tied")
    ids = random_ids(1, 20)
    with pytest.raises(ValueError, match="logits_to_keep"):
        model(input_ids=ids, labels=ids, fam_loss_chunk=8, logits_to_keep=1)
    for bad in (-1, 2.5, "8", True):
        with pytest.raises(ValueError, match="fam_loss_chunk must be a positive"):
            model(input_ids=ids, labels=ids, fam_loss_chunk=bad)
    model._fam_head.loss_function = lambda *a, **k: torch.zeros(())
    with pytest.raises(ValueError, match="custom loss_function"):
        model(input_ids=ids, labels=ids, fam_loss_chunk=8)


def test_finetune_loss_chunk_trains_the_same(tmp_path, monkeypatch):
    """`hf-fam finetune --loss-chunk`: the same logged losses and the same adapter as the model's own loss
    (the recipe's draws and the data order are seeded alike)."""
    import json

    from accelerate.state import AcceleratorState, GradientState

    from hf_fam.tiny import make_tiny_checkpoint
    from hf_fam.training.finetune import DataOptions, FinetuneConfig, LoraOptions, ModelOptions, TrainOptions, finetune

    base = make_tiny_checkpoint(tmp_path / "tiny-llama", "llama")
    docs = tmp_path / "docs"
    docs.mkdir()
    for i in range(4):
        (docs / f"{i}.txt").write_text(f"Story {i}. " + "Once upon a time there was a memory. " * 12)

    def run(name: str, loss_chunk: int):
        config = FinetuneConfig(
            model=ModelOptions(path=str(base), block_size=16, memory_segments=1, fam_length=4),
            data=DataOptions(source="text", text_files=(str(docs),), seq_len=64),
            lora=LoraOptions(r=4),
            train=TrainOptions(output_dir=str(tmp_path / name), max_steps=3, batch_size=2, learning_rate=1e-2,
                               log_every=1, gradient_checkpointing=True, loss_chunk=loss_chunk),
        )
        try:
            result = finetune(config)
        finally:
            AcceleratorState._reset_state(reset_partial_state=True)
            GradientState._reset_state()
        log = [json.loads(line)["loss"] for line in (tmp_path / name / "train_log.jsonl").read_text().splitlines()]
        return torch.tensor(log), result

    from hf_fam.modeling import fam_wrapping

    calls = []
    chunked_lm_loss = fam_wrapping.chunked_lm_loss
    monkeypatch.setattr(fam_wrapping, "chunked_lm_loss", lambda *a, **k: calls.append(a[3]) or chunked_lm_loss(*a, **k))
    plain, _ = run("plain", 0)
    assert calls == []
    chunked, _ = run("chunked", 24)
    assert calls == [24] * 3 and len(plain) == 3
    assert_close(chunked, plain, atol=1e-5)
    with pytest.raises(ValueError, match="loss_chunk"):
        TrainOptions(output_dir=str(tmp_path / "x"), loss_chunk=-1)
