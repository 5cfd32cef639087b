"""The chain's graph steps compiled with torch.compile (hf_fam/modeling/fam_compile.py), a group of
`cuda_checks.py`: compiled graphs == the eager chain for Llama and Gemma 2 (fp32, left-padded batch: logits, and the
final FAM relative to its largest value), with LoRA enabled, disabled, merged and unmerged between forwards; at
the 1B shape (two layers, C=1024 M=3 F=64) in fp32 (relative to the largest logit, as `real_shape_checks`) and
in bf16 (relative, `bf16_kernels`: inductor's fused kernels round at other points than the eager ones); and that
the compiled functions were used (dynamo compiled graphs, no compile failed).

The final FAM is compared relative to its largest value: it is a residual stream (Gemma 2's reaches 31 on the
tiny model), where fp32 itself is 1.7e-5 to 2.4e-5 from fp64 for the eager chain and 1.3e-5 to 1.4e-5 for the
compiled one (CPU, inductor); the two differ by 2.4e-5 absolute, 7.9e-7 relative. On the CPU (a stand-in
graph replaying the compiled calls) this group passed with 30 graphs compiled and no graph break: 1B shape fp32
9.3e-7, bf16 1.12e-2 relative."""

from __future__ import annotations

import time

import torch

import hf_fam
from hf_fam.modeling import fam_compile


def compile_checks(check, build, device: str, fp32: float, bf16_kernels: float):
    from torch._dynamo.utils import counters

    fam_compile.COMPILE_STEPS = True
    fam_compile.reset()
    counters.clear()
    start = time.perf_counter()
    try:
        _family_checks(check, build, device, fp32)
        _lora_checks(check, build, device, fp32)
        _real_shape_checks(check, device, fp32, bf16_kernels)
    finally:
        fam_compile.COMPILE_STEPS = False
    graphs = counters["stats"].get("unique_graphs", 0)
    print(f"     torch.compile: {graphs} graphs compiled, {dict(counters['graph_break']) or 'no'} graph breaks, "
          f"{time.perf_counter() - start:.0f} s for the group", flush=True)
    if device.startswith("cuda"):
        check(f"compiled graph steps used ({graphs} graphs compiled; 0 = not used) and none failed to compile",
              float(graphs == 0 or bool(fam_compile._FAILED)), 0.0)


def _family_checks(check, build, device, fp32):
    C, M, F = 4, 1, 3
    ids = torch.randint(3, 101, (2, 12 * C + 3), generator=torch.Generator().manual_seed(11)).to(device)
    mask = torch.ones_like(ids)
    mask[1, :14] = 0
    # Llama (sdpa) and Gemma 2 (eager attention with soft-capping): every compilation costs seconds of the run's
    # 10 minutes; tests/test_chain_compile.py traces six families on every CPU run
    for family in ("llama", "gemma2"):
        model = hf_fam.FAMForCausalLM.from_base_model(build(family), block_size=C, memory_segments=M, fam_length=F)
        model = model.to(device).eval()
        with torch.no_grad():
            eager = model(ids, attention_mask=mask, fam_cuda_graphs=False)
            outs = [model(ids, attention_mask=mask) for _ in range(3)]  # the probe and init graphs come second
        logits = max(((out.logits - eager.logits).abs() * mask[..., None]).max().item() for out in outs)
        fams = max(((a - b).abs().max() / b.abs().max()).item() for out in outs
                   for a, b in zip(out.fam_state, eager.fam_state))
        check(f"{family}: compiled graph steps == eager chain (logits; three forwards)", logits, fp32)
        check(f"{family}: compiled graph steps == eager chain (final FAM, relative to its largest value)", fams, fp32)


def _lora_checks(check, build, device, fp32):
    try:
        import peft
    except ImportError:
        print("SKIP LoRA with compiled graph steps: peft is not installed", flush=True)
        return
    C, M, F = 4, 1, 3
    ids = torch.randint(3, 101, (2, 12 * C + 3), generator=torch.Generator().manual_seed(12)).to(device)
    base = hf_fam.FAMForCausalLM.from_base_model(build("llama"), block_size=C, memory_segments=M, fam_length=F)
    lora = peft.get_peft_model(base, peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj", "down_proj"],
                                                     init_lora_weights=False)).to(device).eval()

    def both():
        return [lora(ids).logits, lora(ids, fam_cuda_graphs=False).logits]

    with torch.no_grad():
        pairs = [both(), both()]
        with lora.disable_adapter():
            pairs.append(both())
        lora.merge_adapter()
        pairs.append(both())
        lora.unmerge_adapter()
        pairs.append(both())
    check("llama + LoRA: compiled graph steps == eager, adapter enabled, disabled, merged and unmerged between "
          "forwards", max((a - b).abs().max().item() for a, b in pairs), fp32)
    check("llama + LoRA: the adapter changes the logits (the check above is not vacuous)",
          float(torch.allclose(pairs[0][1], pairs[2][1])), 0.0)


def _real_shape_checks(check, device, fp32, bf16_kernels):
    from hf_fam.apps.bench_real import PAPER_SETTINGS, shape_model

    torch.manual_seed(0)
    base = shape_model("llama-3.2-1b", device, 16384, num_hidden_layers=2, vocab_size=1000)
    C = PAPER_SETTINGS["block_size"]
    ids = torch.randint(3, 1000, (2, 10 * C + 17), generator=torch.Generator().manual_seed(2)).to(device)
    relative = lambda a, b: ((a.float() - b.float()).abs().max() / b.float().abs().max()).item()  # noqa: E731
    model = hf_fam.FAMForCausalLM.from_base_model(base, **PAPER_SETTINGS).eval()
    for dtype, bound in ((torch.float32, fp32), (torch.bfloat16, bf16_kernels)):
        model = model.to(dtype)
        with torch.no_grad():
            eager = model(ids, fam_cuda_graphs=False).logits
            compiled = [model(ids).logits for _ in range(2)]
        check(f"1B shape (2 layers), {str(dtype)[6:]}: compiled graph steps == eager chain (relative)",
              max(relative(c, eager) for c in compiled), bound)
