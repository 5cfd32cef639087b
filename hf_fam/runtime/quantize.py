"""Loading a checkpoint with quantized weights (bitsandbytes 4-bit NF4 or 8-bit), the QLoRA recipe: the one place
hf_fam turns `--quantize 4bit|8bit` into a `BitsAndBytesConfig`.

FAM runs the checkpoint's own modules, so a quantized model computes FAM on its quantized layers exactly
(tests/test_quantized.py); `fam_init`, the norms and the embeddings stay unquantized. Training quantized weights
is not possible (LoRA trains beside them); what a quantized fine-tuning run saves is described in
docs/training.md, "Quantized models and QLoRA".

Example:
```python
>>> config = quantization_config("4bit", compute_dtype=torch.bfloat16)
>>> model = AutoModelForCausalLM.from_pretrained("llama-fam", quantization_config=config, device_map={"": "cuda"})
```
"""

from __future__ import annotations

QUANTIZATIONS = ("4bit", "8bit")


def quantization_config(kind: str, compute_dtype):
    """The `BitsAndBytesConfig` for `kind` ("4bit": NF4 with double quantization, computing in `compute_dtype`;
    "8bit": LLM.int8). Raises a one-line error when `kind` is unknown or bitsandbytes is not installed."""
    import torch

    if kind not in QUANTIZATIONS:
        raise ValueError(f"--quantize {kind!r}: expected one of {', '.join(QUANTIZATIONS)}")
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        raise ImportError(f"--quantize {kind} loads the weights with bitsandbytes, which is not installed: "
                          "pip install bitsandbytes (or drop --quantize)") from None
    from transformers import BitsAndBytesConfig

    if kind == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=compute_dtype if compute_dtype != "auto" else torch.float32)


def compute_dtype(dtype, config):
    """The dtype the quantized layers compute in: `dtype` when given (a torch dtype), else ("auto") the
    checkpoint's own dtype, float32 when it states none."""
    import torch

    if dtype != "auto":
        return dtype
    stated = getattr(config, "dtype", None) or getattr(getattr(config, "base_config", None), "dtype", None)
    if isinstance(stated, str):
        stated = getattr(torch, stated, None)
    return stated if isinstance(stated, torch.dtype) else torch.float32


def loading_kwargs(kind: str | None, dtype, config, device) -> dict:
    """The `from_pretrained` arguments that load a checkpoint (`config`, its config) with weights quantized as
    `kind` says, placed on `device` as they load; {} for `kind` None. `dtype`: as `from_pretrained` takes it."""
    if not kind:
        return {}
    # bitsandbytes quantizes on the device the weights load to
    return {"quantization_config": quantization_config(kind, compute_dtype(dtype, config)), "device_map": {"": device}}


def keep_trainable(model) -> None:
    """Keep the 4-bit layers of `model` passing gradients, on the CPU. Call it before the model's first forward.

    bitsandbytes' CPU backend (0.50, on a CPU with AVX512-BF16) repacks a 4-bit layer's weights for its fast kernel
    at the layer's first forward in eval mode without gradients, and from then on that layer passes no gradient
    to its input: only torch's warning that `bitsandbytes::gemv_4bit` has no autograd kernel says so, and
    training through it silently loses every gradient below it (fam_init's among them;
    tests/test_finetune_quantized.py).
    A run that measures the model before training does exactly that. This turns the repacking off; weights
    already repacked are refused in one line, as a FAM training forward refuses them.
    """
    from ..modeling.fam_compat import refuse_repacked_4bit_layers

    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False
    refuse_repacked_4bit_layers(model)


__all__ = ["QUANTIZATIONS", "compute_dtype", "keep_trainable", "loading_kwargs", "quantization_config"]
