"""Can a converted real model's memory learn to carry a passkey one block? A short training probe.

The easiest form of the passkey task for a memory: C = 32, M = 0 (a block sees nothing before itself but the
FAM), and only examples whose whole key sentence sits in the block right before the question's block, so one
memory update has to carry it (`--back K`: K blocks before it, so the memory must keep the key through K - 1
more updates). The loss is on the answer (a space and five digits: guessing gives about 1.92).
Prints JSON lines (held-out answer loss, exact match, share of answer tokens right) every `--eval-every` steps.

    python benchmarks/memory_probe.py --model /work/models/smollm2-135m-instruct --start sink+text --train lora+norms

`--start`: the initial memory: `bos` (the BOS row in every slot, `hf-fam convert`'s default), `sink+text` (slot 0
the BOS row, the others the token embeddings of `--start-text`: what `hf-fam finetune` trains from), `random`.
`--train`: `lora` (the paper's LoRA on the projections, + fam_init), `lora+norms` (`hf-fam finetune`'s default),
`full` (every weight). `--embeddings` adds the input embeddings to a LoRA run or freezes them in a full one;
`--lora-init pissa` starts LoRA from the weights' principal singular vectors (PiSSA) instead of B = 0: the
ablations of "why is LoRA slower than every weight at keeping the key". `--init-attention causal` is an experiment,
not a setting of hf_fam: the initial memory is propagated through the layers with causal attention among its
slots instead of the full attention of docs/design.md §1.4, so with `sink+text` each layer's initial memory is the
base model's own reading of "BOS + start text" as a prompt (slot 0 exactly the attention sink;
`benchmarks/memory_drift.py` measures that start). docs/training.md, "Where training starts
the memory", has the figures.
"""

from __future__ import annotations

import argparse
import json
import random
import time

import torch


def main(argv=None) -> None:
    from hf_fam.training.options import DEFAULT_MEMORY_START_TEXT

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="a base checkpoint folder (e.g. SmolLM2-135M-Instruct)")
    p.add_argument("--start", choices=("bos", "sink+text", "random"), default="sink+text")
    p.add_argument("--start-text", default=DEFAULT_MEMORY_START_TEXT)
    p.add_argument("--train", choices=("lora", "lora+norms", "full"), default="lora+norms")
    p.add_argument("--block-size", type=int, default=32)
    p.add_argument("--fam-length", type=int, default=16)
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--lr", type=float, default=None, help="default: 1e-3 with LoRA, 5e-5 for every weight")
    p.add_argument("--lora-rank", type=int, default=32)
    p.add_argument("--embeddings", choices=("default", "train", "freeze"), default="default",
                   help="the token embeddings: trained as `--train` does (default: only with `full`, with the "
                        "output head tied to them), a trained copy of the input embeddings added to a LoRA run "
                        "(PEFT's modules_to_save; the output head keeps the original), or frozen with `full` "
                        "(the tied head too)")
    p.add_argument("--lora-init", choices=("default", "pissa"), default="default",
                   help="LoRA's start: PEFT's default (B = 0, so the model starts unchanged) or PiSSA (A and B from "
                        "the weight's principal singular vectors, the residual left frozen)")
    p.add_argument("--eval-every", type=int, default=50)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--init-attention", choices=("full", "causal"), default="full",
                   help="among the initial memory's slots as it is propagated (causal: an experiment, see above)")
    p.add_argument("--back", type=int, default=1, help="blocks between the key sentence's block and the question's")
    args = p.parse_args(argv)
    if args.back < 1:
        p.error(f"--back {args.back}: the key must lie at least 1 block before the question's block "
                "(use --back 1 or more)")
    if (args.embeddings == "train") == (args.train == "full") and args.embeddings != "default":
        p.error(f"--embeddings {args.embeddings} with --train {args.train}: 'train' adds the embeddings to a LoRA "
                "run, 'freeze' removes them from a full run")
    if args.lora_init != "default" and args.train == "full":
        p.error(f"--lora-init {args.lora_init} with --train full: no LoRA to start (use --train lora or lora+norms)")
    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    if args.init_attention == "causal":
        causal_initial_memory()
    model, tokenizer = build(args)
    train, test = examples(args, tokenizer, 1, 4000), examples(args, tokenizer, 2, 48)
    params = [q for q in model.parameters() if q.requires_grad]
    lr = args.lr or (5e-5 if args.train == "full" else 1e-3)
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    print(json.dumps({"settings": vars(args), "lr": lr, "trainable": sum(q.numel() for q in params),
                      "train_examples": len(train)}), flush=True)
    print(json.dumps({"step": 0, **evaluate(model, tokenizer, test)}), flush=True)
    rng, start = random.Random(0), time.perf_counter()
    for step in range(1, args.steps + 1):
        for group in optimizer.param_groups:
            group["lr"] = lr * min(1.0, step / 20)
        loss = answer_loss(model, tokenizer, rng.sample(train, args.batch_size))[0]
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad()
        if step % args.eval_every == 0:
            print(json.dumps({"step": step, "train_loss": round(loss.item(), 3), **evaluate(model, tokenizer, test),
                              "minutes": round((time.perf_counter() - start) / 60, 1)}), flush=True)


def causal_initial_memory() -> None:
    """Make the propagation of the initial memory (FAMStep mode "init") attend causally among the F slots, for
    this process: an experiment on the training start, not an hf_fam setting (design §1.4 says full attention)."""
    from hf_fam.modeling import fam_chain
    from hf_fam.modeling.fam_compat import call_inner_attention

    full = fam_chain.FAMStep.attend

    def attend(step, module, query, key, value, kwargs):
        if step.mode != "init":
            return full(step, module, query, key, value, kwargs)
        step.fam_k, step.fam_v = key, value
        slots = query.shape[2]
        causal = torch.ones(slots, slots, dtype=torch.bool, device=query.device).tril()[None, None]
        return call_inner_attention(module, step.inner, query, key, value, causal, kwargs)

    fam_chain.FAMStep.attend = attend


def build(args):
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from hf_fam.checkpoint_io.fam_init import bos_fam_init, training_fam_init
    from hf_fam.modeling.modeling_fam import FAMForCausalLM
    from hf_fam.training.lora import fam_lora_config

    tokenizer = AutoTokenizer.from_pretrained(args.model)
    base = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    fam_init = bos_fam_init(base, args.fam_length)
    if args.start == "sink+text":
        fam_init = training_fam_init(fam_init, tokenizer, base.get_input_embeddings().weight, args.start_text)
    elif args.start == "random":
        fam_init = torch.randn(args.fam_length, fam_init.shape[1]) * base.config.initializer_range
    model = FAMForCausalLM.from_base_model(base, block_size=args.block_size, memory_segments=0,
                                           fam_length=args.fam_length, fam_init=fam_init, fam_update="paper")
    if args.train != "full":
        extra = []
        if args.embeddings == "train":  # PEFT's modules_to_save names a module by the last part of its name
            embeddings = model.get_input_embeddings()
            extra.append(next(n for n, m in model.named_modules() if m is embeddings).rsplit(".", 1)[-1])
        init = {"init_lora_weights": "pissa_niter_4"} if args.lora_init == "pissa" else {}
        model = get_peft_model(model, fam_lora_config(model, r=args.lora_rank, train_norms=args.train == "lora+norms",
                                                      modules_to_save=extra, **init))
    elif args.embeddings == "freeze":
        model.get_input_embeddings().weight.requires_grad_(False)
    return model.train(), tokenizer


def examples(args, tokenizer, seed: int, n: int) -> list[dict]:
    """Text passkey examples whose key sentence lies whole in the block `--back` blocks before the question's."""
    from hf_fam.tasks.passkey import PasskeyConfig, passkey_examples

    C = args.block_size
    back = args.back
    config = PasskeyConfig(num_examples=40 * back * n, seq_len=(back + 3) * C, min_seq_len=max((back + 1) * C, 80),
                           seed=seed)
    out = []
    for row in passkey_examples(config, tokenizer):
        question_block = (row["prompt_length"] - 1) // C
        if row["key_position"] // C == question_block - back == (row["key_end"] - 1) // C:
            out.append(row)
            if len(out) == n:
                break
    return out


def answer_loss(model, tokenizer, rows):
    """(answer loss, share of answers exactly right, share of answer tokens right) on a padded batch of rows."""
    from hf_fam.tasks.passkey import passkey_exact_match

    width = max(len(r["input_ids"]) for r in rows)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0

    def padded(key, value):
        return torch.tensor([list(r[key]) + [value] * (width - len(r[key])) for r in rows])

    ids, labels = padded("input_ids", pad), padded("labels", -100)
    mask = torch.tensor([[1] * len(r["input_ids"]) + [0] * (width - len(r["input_ids"])) for r in rows])
    logits = model(input_ids=ids, attention_mask=mask).logits.float()
    target = labels[:, 1:]
    loss = torch.nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2), target, ignore_index=-100)
    scored, right = target != -100, logits[:, :-1].argmax(-1) == target
    exact = passkey_exact_match(logits, labels).float().mean().item()
    return loss, exact, ((right & scored).sum() / scored.sum()).item()


def evaluate(model, tokenizer, test) -> dict:
    model.eval()
    losses, exact, tokens = [], [], []
    with torch.no_grad():
        for i in range(0, len(test), 8):
            loss, e, t = answer_loss(model, tokenizer, test[i : i + 8])
            losses.append(loss.item())
            exact.append(e)
            tokens.append(t)
    model.train()
    return {"answer_loss": round(sum(losses) / len(losses), 3), "exact_match": round(sum(exact) / len(exact), 3),
            "answer_tokens_right": round(sum(tokens) / len(tokens), 3)}


if __name__ == "__main__":
    main()
