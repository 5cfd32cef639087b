"""LoRA fine-tuning of a FAM checkpoint, in one process or under FSDP on several CPU processes (gloo).

    python tests/scripts/fsdp_lora.py FOLDER OUT.pt --mode single
    torchrun --standalone --nproc_per_node 2 tests/scripts/fsdp_lora.py FOLDER OUT.pt --mode fsdp

Both train the same LoRA adapter (with `fam.fam_init` in modules_to_save) for `--steps` AdamW steps on the same
global batches of 4 rows: "single" runs each batch as two micro-batches of 2 and averages their losses; "fsdp"
gives each of 2 ranks its 2 rows, the decoder layers and the whole model sharded with torch's FSDP2 (`fully_shard`),
which averages the gradients. accelerate 1.15 does not shard on CPU: `Accelerator(cpu=True, fsdp_plugin=...)`
stays MULTI_CPU (DDP) and ignores the plugin, so the script only lets it set up the gloo process group (and
records its distributed type). The trained adapter (LoRA weights and fam_init, full tensors) is saved to OUT.pt by
rank 0, with the per-step losses.

FAM calls each decoder layer again inside that layer's own forward (the memory update of every block), so a
decoder layer wrapped as its own FSDP unit must keep its parameters gathered until the end of the forward:
`--reshard-after-forward` (FSDP2's default) reshards them when the inner call ends and the outer one fails with
"aten.mm.default got mixed torch.Tensor and DTensor". The default here is `reshard_after_forward=False`.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch


def adapter_state(model) -> dict[str, torch.Tensor]:
    """Trainable tensors (LoRA A/B and the trained copy of fam_init) by name, as full CPU tensors."""
    return {name: param.detach().cpu().clone() for name, param in model.named_parameters() if param.requires_grad}


def build(folder: str):
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM

    from hf_fam.training import fam_lora_config

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    peft_model = get_peft_model(model, fam_lora_config(model, r=4, lora_dropout=0.0))
    return model, peft_model


def batches(steps: int, vocab: int, length: int = 40):
    g = torch.Generator().manual_seed(1)
    for _ in range(steps):
        ids = torch.randint(3, vocab, (4, length), generator=g)
        mask = torch.ones_like(ids)
        mask[1, 29:] = 0  # one right-padded row per half
        mask[3, 17:] = 0
        yield ids, mask


def loss_of(model, ids, mask):
    labels = ids.masked_fill(mask == 0, -100)
    return model(input_ids=ids, attention_mask=mask, labels=labels, use_cache=False).loss


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("folder")
    parser.add_argument("out")
    parser.add_argument("--mode", choices=("single", "fsdp"), required=True)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--lr", type=float, default=1e-2)
    parser.add_argument("--reshard-after-forward", action="store_true")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    start = time.perf_counter()

    if args.mode == "single":
        fam, model = build(args.folder)
        model.train()
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.lr)
        losses = []
        for ids, mask in batches(args.steps, fam.config.vocab_size):
            halves = [loss_of(model, ids[i : i + 2], mask[i : i + 2]) for i in (0, 2)]
            loss = (halves[0] + halves[1]) / 2
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            losses.append([h.item() for h in halves])
        torch.save({"state": adapter_state(model), "losses": losses, "seconds": time.perf_counter() - start}, args.out)
        return 0

    import torch.distributed as dist
    from accelerate import Accelerator
    from accelerate.utils import FullyShardedDataParallelPlugin
    from torch.distributed.fsdp import fully_shard

    # accelerate 1.15 only turns FSDP on for accelerator devices: on CPU it keeps MULTI_CPU (DDP) and ignores the
    # plugin. It still sets up the gloo process group; the sharding below is torch's FSDP2 itself.
    accelerator = Accelerator(cpu=True, fsdp_plugin=FullyShardedDataParallelPlugin(fsdp_version=2))
    rank, world = accelerator.process_index, accelerator.num_processes
    if world != 2 or not dist.is_initialized():
        raise SystemExit(f"--mode fsdp needs 2 processes, got {world}")

    def shard(model, fam, reshard_after_forward):
        for layer in fam.get_decoder().layers:
            fully_shard(layer, reshard_after_forward=reshard_after_forward)
        fully_shard(model, reshard_after_forward=reshard_after_forward)
        return model

    fam, model = build(args.folder)
    shard(model, fam, args.reshard_after_forward)
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.lr)
    sharded = sum(type(p).__name__ == "DTensor" for p in model.parameters())
    losses = []
    for ids, mask in batches(args.steps, fam.config.vocab_size):
        loss = loss_of(model, ids[2 * rank : 2 * rank + 2], mask[2 * rank : 2 * rank + 2])
        loss.backward()  # FSDP2 reduce-scatters the gradients, averaged over the ranks
        optimizer.step()
        optimizer.zero_grad()
        both = [torch.zeros(1) for _ in range(world)]
        dist.all_gather(both, loss.detach()[None])
        losses.append([t.item() for t in both])
    # full tensors (every rank takes part in the gathers)
    state = {name: (p.full_tensor() if hasattr(p, "full_tensor") else p).detach().cpu().clone()
             for name, p in model.named_parameters() if p.requires_grad}

    # FSDP2's default, resharding each layer after its forward, breaks on FAM's nested layer calls
    default_error = None
    if not args.reshard_after_forward:
        fam2, model2 = build(args.folder)
        shard(model2, fam2, True)
        try:
            ids, mask = next(batches(1, fam2.config.vocab_size))
            loss_of(model2, ids[2 * rank : 2 * rank + 2], mask[2 * rank : 2 * rank + 2])
        except Exception as error:  # noqa: BLE001 - recorded for the test to check
            default_error = f"{type(error).__name__}: {str(error).splitlines()[0]}"
    if rank == 0:
        torch.save({"state": state, "losses": losses, "seconds": time.perf_counter() - start,
                    "accelerate_distributed_type": str(accelerator.distributed_type), "dtensor_params": sharded,
                    "world": world, "default_reshard_error": default_error}, args.out)
    dist.barrier()
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.path.insert(0, os.getcwd())
    sys.exit(main())
