"""Quantized weights (bitsandbytes 4-bit and 8-bit, `BitsAndBytesConfig`) and QLoRA: FAM runs the checkpoint's own
modules, so a quantized FAM model computes FAM on the quantized layers, exactly.

- A FAM checkpoint loaded in 4 or 8 bits = the reference FAM computation (tests/fam_reference.py) on the plain
  base loaded the same way, with the checkpoint's `fam_init`; its parallel, chunked and token-by-token schedules
  agree.
- `hf_fam.patch` of a quantized plain model = the quantized FAM checkpoint; with the memory off and a window covering
  the input, it is the quantized model itself.
- QLoRA (`prepare_model_for_kbit_training`, `fam_lora_config`) trains the adapter and `fam_init` on the 4-bit model,
  and the saved adapter, loaded on a fresh 4-bit base, gives the trained model's logits.

bitsandbytes runs these on the CPU from 0.48 (its CPU backend); tests skip where it cannot.
"""

from __future__ import annotations

import pytest
import torch
from client_helpers import SETTINGS, base_folder, fam_checkpoint, normalised
from conftest import assert_close, padding_mask
from fam_reference import reference_fam_logits
from transformers import AutoModelForCausalLM, BitsAndBytesConfig

import hf_fam
from hf_fam import FAMForCausalLM
from hf_fam.training import fam_lora_config, unwrap_fam_model

bnb = pytest.importorskip("bitsandbytes")
try:
    bnb.functional.quantize_4bit(torch.ones(64, 64))
except Exception as error:  # no backend for this machine
    pytest.skip(f"bitsandbytes cannot quantize here: {error}", allow_module_level=True)

C, M, F = SETTINGS["block_size"], SETTINGS["memory_segments"], SETTINGS["fam_length"]
BITS = {
    "4bit": dict(load_in_4bit=True, bnb_4bit_compute_dtype=torch.float32, bnb_4bit_quant_type="nf4"),
    "8bit": dict(load_in_8bit=True),
}


def _load(path, bits, **kwargs):
    config = BitsAndBytesConfig(**BITS[bits])
    return AutoModelForCausalLM.from_pretrained(path, quantization_config=config, device_map="cpu",
                                                dtype=torch.float32, **kwargs).eval()


def _ids(batch=2, length=5 * C + 3, seed=0):
    return torch.randint(3, 250, (batch, length), generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def fam_folder(tmp_path_factory):
    return fam_checkpoint(tmp_path_factory.mktemp("quantized") / "fam")


@pytest.mark.parametrize("bits", BITS)
def test_a_quantized_fam_checkpoint_computes_fam_on_its_quantized_layers(fam_folder, bits):
    model = _load(fam_folder, bits)
    linear = model.model.layers[0].self_attn.q_proj
    assert type(linear).__module__.startswith("bitsandbytes"), type(linear)
    plain = _load(base_folder(fam_folder), bits)
    ids = _ids()
    mask = padding_mask([ids.shape[1], ids.shape[1] - 7], ids.shape[1], side="left")
    with torch.no_grad():
        got = model(ids, attention_mask=mask).logits
        expected = reference_fam_logits(plain, ids, mask, C, M, F, model.fam.fam_init.detach().float())
    assert_close(got, expected, atol=1e-5, mask=mask)

    # the streaming schedules: chunked prefill through the cache, and token by token
    with torch.no_grad():
        parallel = model(ids, use_cache=False).logits
        for chunk in (1, 3 * C + 5):
            cache, outs = None, []
            for start in range(0, ids.shape[1], chunk):
                out = model(ids[:, start:start + chunk], past_key_values=cache, use_cache=True)
                cache, outs = out.past_key_values, outs + [out.logits]
            assert_close(torch.cat(outs, 1), parallel, atol=1e-5, msg=f"{bits} chunk {chunk}")


@pytest.mark.parametrize("route", ["checkpoint", "patched", "wrapped"])
@pytest.mark.parametrize("bits", BITS)
def test_a_quantized_fam_model_saved_in_its_bits_loads_as_it_was(fam_folder, tmp_path, bits, route):
    """Saved = loaded in 4 and 8 bits, for a FAM checkpoint loaded quantized, a quantized model patched and one
    wrapped by `FAMForCausalLM.from_base_model` (repacking for bitsandbytes' CPU kernel kept off: a model saved after
    it reloads 0.03 off, plain models too)."""
    from hf_fam.runtime.quantize import keep_trainable

    if route == "checkpoint":
        model = _load(fam_folder, bits)
    elif route == "wrapped":
        model = FAMForCausalLM.from_base_model(_load(base_folder(fam_folder), bits), **SETTINGS)
    else:
        model = hf_fam.patch(_load(base_folder(fam_folder), bits), block_size=C, memory_segments=M, fam_length=F)
        with torch.no_grad():
            unwrap_fam_model(model).fam.fam_init.normal_(0, 0.02, generator=torch.Generator().manual_seed(0))
    keep_trainable(model)
    ids = _ids(seed=5)
    with torch.no_grad():
        expected = model(ids).logits
    model.save_pretrained(tmp_path / "saved")
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "saved", device_map="cpu").eval()
    keep_trainable(again)
    assert type(again.model.layers[0].self_attn.q_proj).__module__.startswith("bitsandbytes")
    assert type(again).__name__ == "FAMForCausalLM"
    with torch.no_grad():
        assert_close(again(ids).logits, expected, atol=0.0)


@pytest.mark.parametrize("bits", BITS)
def test_a_wrapped_quantized_base_tells_the_clients_it_is_quantized(fam_folder, tmp_path, bits):
    """PEFT's QLoRA preparation, TRL and the Trainer ask the model whether it is quantized (`is_loaded_in_4bit`,
    `quantization_method`, `hf_quantizer`, ...). `from_base_model` over a quantized base answers as the base
    does. Without that, `prepare_model_for_kbit_training` left checkpointing off, the Trainer set out to fine-tune
    the quantized weights in full, and a cast to another dtype went through."""
    from peft import prepare_model_for_kbit_training
    from transformers import Trainer, TrainingArguments

    from hf_fam.modeling.fam_compat import LOAD_MARKERS

    base = _load(base_folder(fam_folder), bits)
    model = FAMForCausalLM.from_base_model(base, **SETTINGS)
    markers = {name: getattr(base, name) for name in LOAD_MARKERS if hasattr(base, name)}
    assert markers["is_quantized"] and markers["hf_quantizer"] is not None
    assert {name: getattr(model, name, None) for name in markers} == markers
    with pytest.raises(ValueError, match="cannot cast a bitsandbytes model"):
        model.to(torch.float16)
    with pytest.raises(ValueError, match="purely quantized"):
        Trainer(model=model, args=TrainingArguments(str(tmp_path / "out"), use_cpu=True, report_to=[]))
    prepare_model_for_kbit_training(model)
    assert getattr(unwrap_fam_model(model).model.layers[0], "gradient_checkpointing", False)


@pytest.mark.parametrize("route", ["checkpoint", "wrapped"])
def test_dequantize_gives_the_same_fam_model_in_plain_weights(fam_folder, tmp_path, route):
    """transformers' `model.dequantize()`: plain Linear layers, the same logits, and it saves and loads as a plain
    FAM checkpoint. A wrapped base's quantization config lives on its own config, which the FAM config reads
    (`FAMConfig.__delattr__` deletes it there)."""
    from hf_fam.runtime.quantize import keep_trainable

    if route == "checkpoint":
        model = _load(fam_folder, "4bit")
    else:
        model = FAMForCausalLM.from_base_model(_load(base_folder(fam_folder), "4bit"), **SETTINGS)
    keep_trainable(model)
    ids = _ids(seed=6)
    with torch.no_grad():
        expected = model(ids).logits
    model = model.dequantize() or model
    assert type(unwrap_fam_model(model).model.layers[0].self_attn.q_proj) is torch.nn.Linear
    assert not model.is_quantized and getattr(model.config, "quantization_config", None) is None
    with torch.no_grad():
        assert_close(model(ids).logits, expected, atol=1e-5)
    model.save_pretrained(tmp_path / "plain")
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "plain", dtype=torch.float32).eval()
    assert type(again.model.layers[0].self_attn.q_proj) is torch.nn.Linear
    with torch.no_grad():
        assert_close(again(ids).logits, expected, atol=1e-5)


def test_patching_a_quantized_model_is_the_quantized_fam_checkpoint(fam_folder):
    ids = _ids(seed=1)
    checkpoint = _load(fam_folder, "4bit")
    patched = hf_fam.patch(_load(base_folder(fam_folder), "4bit"), **SETTINGS,
                           fam_init=checkpoint.fam.fam_init.detach().clone(), fam_update="paper")
    plain = _load(base_folder(fam_folder), "4bit")
    off = hf_fam.patch(_load(base_folder(fam_folder), "4bit"), block_size=ids.shape[1], memory_segments=0,
                       fam_length=0)
    with torch.no_grad():
        assert_close(patched(ids).logits, checkpoint(ids).logits, atol=1e-5)
        assert_close(off(ids).logits, plain(ids).logits, atol=1e-5)


def test_qlora_trains_the_memory_and_its_adapter_reloads_on_a_4bit_base(fam_folder, tmp_path):
    from peft import PeftModel, get_peft_model, prepare_model_for_kbit_training

    model = prepare_model_for_kbit_training(_load(fam_folder, "4bit"), use_gradient_checkpointing=True)
    fam_init = model.fam.fam_init.detach().clone()
    peft_model = get_peft_model(model, fam_lora_config(model, r=4))
    peft_model.train()
    optimizer = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=5e-2)
    ids, losses = _ids(batch=2, length=4 * C, seed=2), []
    for _ in range(3):
        loss = peft_model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0], losses
    trained_init = unwrap_fam_model(peft_model).fam.modules_to_save["default"].fam_init
    assert (trained_init.detach() - fam_init).abs().max() > 1e-4  # the memory trained through the 4-bit layers

    peft_model.eval()
    peft_model.save_pretrained(tmp_path / "adapter")
    reloaded = PeftModel.from_pretrained(_load(fam_folder, "4bit"), tmp_path / "adapter").eval()
    test_ids = _ids(seed=3)
    with torch.no_grad():
        assert_close(reloaded(test_ids).logits, peft_model(test_ids).logits, atol=1e-5)


@pytest.mark.parametrize("bits", BITS)
def test_qlora_gradients_are_lora_gradients_on_the_dequantized_weights(fam_folder, bits):
    """The gradients a QLoRA step computes (LoRA, fam_init, norms) are those of the same LoRA on a full-precision
    model holding the quantized weights dequantized: nothing of FAM's gradient is lost in the quantized layers."""
    from peft import get_peft_model

    from hf_fam.runtime.quantize import keep_trainable

    quantized = _load(fam_folder, bits)
    keep_trainable(quantized)
    plain = AutoModelForCausalLM.from_pretrained(fam_folder, dtype=torch.float32)
    with torch.no_grad():
        for name, module in quantized.named_modules():
            if type(module).__module__.startswith("bitsandbytes"):
                weight = module.weight
                if bits == "4bit":
                    dense = bnb.functional.dequantize_4bit(weight.data, weight.quant_state)
                else:  # LLM.int8: int8 rows and a scale per row
                    dense = weight.data.float() * weight.SCB.float()[:, None] / 127
                plain.get_submodule(name).weight.copy_(dense)
    models = []
    for model in (quantized, plain):
        torch.manual_seed(0)
        peft_model = get_peft_model(model, fam_lora_config(model, r=4)).train()
        with torch.no_grad():  # B = 0 at the start would leave A without gradient
            for name, param in peft_model.named_parameters():
                if "lora_B" in name:
                    param.copy_(torch.randn(param.shape, generator=torch.Generator().manual_seed(len(name))) * 0.1)
        models.append(peft_model)
    ids = _ids(batch=2, length=3 * C + 5, seed=4)
    mask = padding_mask([ids.shape[1], ids.shape[1] - 5], ids.shape[1], side="left")
    grads = []
    for peft_model in models:
        loss = peft_model(input_ids=ids, attention_mask=mask, labels=ids).loss
        loss.backward()
        grads.append({n: p.grad for n, p in peft_model.named_parameters() if p.requires_grad})
    assert grads[0].keys() == grads[1].keys() and any("fam_init" in n for n in grads[0])
    for name in grads[0]:
        assert grads[0][name] is not None and grads[0][name].abs().max() > 0, name
        assert_close(grads[0][name], grads[1][name], atol=1e-5, msg=name)


def test_trl_sft_trainer_trains_a_4bit_fam_model(fam_folder, tmp_path):
    """TRL's SFTTrainer on a 4-bit model: it prepares the model for k-bit training itself and keeps the adapter's
    trained weights in bf16, fam_init among them, while the layers compute in fp32. The loss it optimises is the
    FAM model's on the batch, and the bf16 fam_init trains."""
    trl = pytest.importorskip("trl")
    from datasets import Dataset
    from transformers import AutoTokenizer

    model = _load(fam_folder, "4bit")
    fam_init = model.fam.fam_init.detach().clone()
    texts = [f"{text} {text}" for text in ("the quick brown fox jumps over the lazy dog",
                                           "a feedback attention memory reads long input block by block")] * 2
    config = trl.SFTConfig(output_dir=str(tmp_path / "out"), max_steps=2, per_device_train_batch_size=2,
                           learning_rate=5e-2, logging_steps=1, save_strategy="no", report_to=[], use_cpu=True,
                           bf16=False, gradient_checkpointing=True, seed=0, disable_tqdm=True)
    losses = []

    class Recording(trl.SFTTrainer):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            loss = super().compute_loss(model, inputs, return_outputs=return_outputs,
                                        num_items_in_batch=num_items_in_batch)
            with torch.no_grad():
                direct = model(input_ids=inputs["input_ids"], attention_mask=inputs.get("attention_mask"),
                               labels=inputs["labels"], use_cache=False, **normalised(num_items_in_batch)).loss
            losses.append(((loss[0] if isinstance(loss, tuple) else loss).item(), direct.item()))
            return loss

    trainer = Recording(model=model, args=config, train_dataset=Dataset.from_dict({"text": texts}),
                        processing_class=AutoTokenizer.from_pretrained(fam_folder),
                        peft_config=fam_lora_config(model, r=4))
    trainer.train()
    assert len(losses) == 2
    for trained, direct in losses:
        assert abs(trained - direct) <= 1e-5, losses
    trained_init = unwrap_fam_model(trainer.model).fam.modules_to_save["default"].fam_init
    assert trained_init.dtype == torch.bfloat16  # TRL's QLoRA convention: the case this test is about
    assert (trained_init.detach().float() - fam_init).abs().max() > 1e-3
