"""The training chain on CUDA (hf_fam/modeling/fam_chain_grad.py), a group of `cuda_checks.py`: gradients of the
chain recomputed step by step in backward == the chain autograd records, eagerly and with CUDA graphs
(`TRAINING_GRAPHS`: the forward's steps and each update step's backward replayed), with LoRA enabled, disabled
and changed in place between steps, in fp32 and bf16; and under bf16 autocast, checkpointed (autocast's cast
cache off, `fam_compat.autocast_without_cache`) == not checkpointed without the cache."""

from __future__ import annotations

import contextlib

import peft
import torch

import hf_fam
from hf_fam.modeling import fam_chain_grad, fam_graphs
from hf_fam.modeling.fam_compat import enable_checkpointing


def training_checks(check, build, device: str, fp32: float, bf16_same: float):
    C, M, F = 4, 1, 3
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(3, 101, (2, 11 * C + 2), generator=g).to(device)  # 11 update steps and a probe per layer
    replays = [0]
    step = fam_graphs.ChainGraph.step

    def counted(self, *args):
        replays[0] += 1
        return step(self, *args)

    def model(dtype):
        torch.manual_seed(5)
        base = hf_fam.FAMForCausalLM.from_base_model(build("llama"), block_size=C, memory_segments=M, fam_length=F)
        enable_checkpointing(base)
        config = peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj", "down_proj"], init_lora_weights=False,
                                 modules_to_save=["fam"])
        return peft.get_peft_model(base, config).to(device, dtype).train()

    def grads(lora, mode):
        lora.zero_grad(set_to_none=True)
        context = fam_chain_grad.eager_autograd_chain() if mode == "recorded" else contextlib.nullcontext()
        fam_chain_grad.TRAINING_GRAPHS = mode == "graphs"
        try:
            with context:
                embeds = lora.get_input_embeddings()(ids).detach().requires_grad_(True)
                lora(inputs_embeds=embeds, labels=ids).loss.backward()
        finally:
            fam_chain_grad.TRAINING_GRAPHS = False
        found = [p.grad for p in lora.parameters() if p.grad is not None] + [embeds.grad]
        return torch.cat([g.float().flatten() for g in found])

    fam_graphs.ChainGraph.step = counted
    try:
        for dtype, bound in ((torch.float32, fp32), (torch.bfloat16, bf16_same)):
            name = str(dtype).removeprefix("torch.")
            lora = model(dtype)
            worst, used = 0.0, 0
            for round_ in range(3):  # the graphs are captured on the second forward that meets them
                if round_ == 2:
                    with torch.no_grad():  # an optimizer's in-place update: kept graphs read the new weights
                        for p in lora.parameters():
                            if p.requires_grad:
                                p.add_(0.01 * torch.randn_like(p))
                recorded = grads(lora, "recorded")
                scale = recorded.abs().max().item()
                before = replays[0]
                graphed = grads(lora, "graphs")
                used += replays[0] - before
                eager = grads(lora, "eager")
                worst = max(worst, (graphed - recorded).abs().max().item() / scale,
                            (eager - recorded).abs().max().item() / scale)
            check(f"training, {name}: recomputed chain, eager and from CUDA graphs == recorded chain (gradients, "
                  "relative), LoRA changed in place between steps", worst, bound)
            if device.startswith("cuda"):
                check(f"training, {name}: CUDA graphs replayed ({used} steps; 0 = not used)", float(used == 0), 0.0)
            with lora.disable_adapter():
                off = [grads(lora, mode) for mode in ("recorded", "graphs")]
            check(f"training, {name}: adapter disabled, from CUDA graphs == recorded (input gradient, relative)",
                  (off[1] - off[0]).abs().max().item() / off[0].abs().max().item(), bound)
    finally:
        fam_graphs.ChainGraph.step = step

    def autocast_grads(checkpointing: bool):
        torch.manual_seed(5)
        model = hf_fam.FAMForCausalLM.from_base_model(build("llama"), block_size=C, memory_segments=M, fam_length=F)
        model = model.to(device).train()
        if checkpointing:
            enable_checkpointing(model)
        with torch.autocast(device.split(":")[0], dtype=torch.bfloat16, cache_enabled=checkpointing):
            embeds = model.get_input_embeddings()(ids).detach().requires_grad_(True)
            model(inputs_embeds=embeds, labels=ids).loss.backward()
        found = [p.grad for p in model.parameters() if p.grad is not None] + [embeds.grad]
        return torch.cat([g.float().flatten() for g in found])

    plain, checkpointed = autocast_grads(False), autocast_grads(True)
    check("training, bf16 autocast, every weight: checkpointed (cast cache off) == not checkpointed without the "
          "cache (gradients, relative)", (checkpointed - plain).abs().max().item() / plain.abs().max().item(),
          bf16_same)
