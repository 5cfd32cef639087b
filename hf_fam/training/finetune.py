"""Fine-tuning of a FAM model with accelerate, LoRA or every weight: the library behind `hf-fam finetune`.

One loop, the paper's recipe (§3.1, Appendix B): LoRA on attention and MLP with the initial memory `fam_init`
trained in full, Random State Passing and Random Position Offset (`hf_fam.training.recipe`), on packed text
files or the passkey task. `LoraOptions(full=True)` (`--full`) trains every weight instead (and `fam_init` with
them) under the same recipe. It runs on one CPU or GPU as it is, and on several processes under
`accelerate launch` (or `torchrun`); on a machine without GPUs the processes talk over gloo.

What a LoRA run writes to `output_dir` (a `--full` run: the whole FAM checkpoint, with its tokenizer, and the
logs; `AutoModelForCausalLM.from_pretrained(output_dir)` loads it):
- the adapter (`adapter_config.json`, `adapter_model.safetensors`, with `fam.fam_init`) and the tokenizer:
  `AutoPeftModelForCausalLM.from_pretrained(output_dir)` reloads it (`trust_remote_code=True` without hf_fam);
  after a PiSSA start (`LoraOptions.init`), PEFT's conversion of it, of twice the rank, which applies to the
  unchanged base weights like any other adapter (`hf_fam.training.lora.save_adapter`);
- `fam_base/`, when the model was a base checkpoint converted on the fly: the FAM checkpoint the adapter
  applies to (the base weights, unchanged, with the initial memory); the adapter points to it;
- `merged/` with `merge=True`: a standalone FAM checkpoint (LoRA merged, trained `fam_init`), as the paper
  uses for inference;
- `train_log.jsonl` (one line per logged step), `finetune_config.json`, `train_summary.json` (including a
  digest of the trained weights on every process, `outputs.weights_digest`: they must agree after data-parallel
  training; after a PiSSA start, of the weights as trained, before the conversion).

An existing non-empty `output_dir` is refused unless `overwrite=True` (`--force`); the run writes to a hidden
folder beside it, moved into place when complete: a failed run leaves nothing, and old and new outputs never mix.

Example:
```python
>>> config = FinetuneConfig(
...     model=ModelOptions(path="llama-fam"),
...     data=DataOptions(source="passkey", seq_len=4096),
...     train=TrainOptions(output_dir="runs/passkey", max_steps=500),
... )
>>> result = finetune(config)
```
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
from dataclasses import asdict
from pathlib import Path

import torch

from ..checkpoint_io.adapter_card import module_names
from ..modeling.fam_compat import enable_checkpointing
from ..runtime.quantize import keep_trainable
from . import continued, resume, text_check
from .data import FAMDataCollator, build_train_dataset, check_text_files
from .fam_base_files import write_fam_base
from .heldout import heldout_loss, heldout_text, split_heldout, worse_than
from .lora import PEFT_LORA_INITS, changes_base_weights, fam_lora_config, save_lora_start, unwrap_fam_model
from .options import (  # noqa: F401  (DTYPES, DATA_SOURCES, SCHEDULERS: re-exported)
    DATA_SOURCES,
    DTYPES,
    SCHEDULERS,
    DataOptions,
    FinetuneConfig,
    FinetuneResult,
    LoraOptions,
    ModelOptions,
    TrainOptions,
    split_text,
)
from .outputs import adapter_digest, check_output_dir, save_run, weights_digest
from .recipe import attach_recipe
from .training_base import is_training_start, training_start

logger = logging.getLogger("hf_fam.training")
# inside the run's staging folder, removed once the adapter is saved
LORA_START_FOLDER = "lora_start"  # PEFT loads it as an adapter named after the folder: no dots

# ----------------------------------------------------------------------------------------------------------
# loading
# ----------------------------------------------------------------------------------------------------------
def load_fam_model(options: ModelOptions, device="cpu"):
    """Load a FAM checkpoint, or a base checkpoint wrapped with `FAMForCausalLM.from_base_model`.

    Args:
        options: the path, and C/M/F for a base checkpoint (a FAM checkpoint keeps its own; differing values
            are an error); `quantize` loads the weights quantized.
        device: where quantized weights load (others load on the CPU and move with the training).

    Returns:
        (model, tokenizer or None, converted): `converted` is True for a base checkpoint.
    """
    from transformers import AutoConfig

    from ..runtime.loading import hub_access
    from ..runtime.loading import load_fam_model as load

    model, tokenizer = load(options.path, **options.loading(device))
    model.train()
    hub = {} if Path(options.path).expanduser().exists() else hub_access(options.path)
    converted = AutoConfig.from_pretrained(options.path, **hub).model_type != "fam"
    return model, tokenizer, converted


# ----------------------------------------------------------------------------------------------------------
# the loop
# ----------------------------------------------------------------------------------------------------------
def finetune(config: FinetuneConfig, accelerator=None) -> FinetuneResult:
    """LoRA-fine-tune a FAM model with the paper's recipe; save the adapter (and optionally the merged model).

    Args:
        config: model, data, LoRA, recipe and loop options.
        accelerator: an `accelerate.Accelerator`; one is made when None (CPU where no GPU is present).

    Returns:
        A `FinetuneResult` (paths, steps, final loss, seconds, per-process adapter digests, the PeftModel).
    """
    from accelerate import Accelerator, DistributedDataParallelKwargs

    t_opt = config.train
    if accelerator is None:
        # a step that starts from a passed state does not use fam_init: DDP must allow unused parameters
        handlers = [DistributedDataParallelKwargs(find_unused_parameters=config.recipe.state_passing_prob > 0)]
        accelerator = Accelerator(
            cpu=t_opt.cpu or not torch.cuda.is_available(),
            gradient_accumulation_steps=t_opt.gradient_accumulation_steps,
            kwargs_handlers=handlers,
        )
    elif accelerator.num_processes > 1 and config.recipe.state_passing_prob > 0:
        handler = getattr(accelerator, "ddp_handler", None)
        if not getattr(handler, "find_unused_parameters", False):
            raise ValueError(
                "Random State Passing leaves fam_init unused in some steps, which DDP refuses by default: build the "
                "Accelerator with kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True)]."
            )
    out = Path(t_opt.output_dir)
    check_output_dir(out, t_opt.overwrite)  # on every process, before any process writes
    check_text_files(config.data)  # before the model loads
    resume_from = resume.check_states(out, t_opt.resume, t_opt.overwrite)
    accelerator.wait_for_everyone()
    if resume_from is None and accelerator.is_main_process:
        resume.start_over(out)  # --force: an interrupted run's states are not mixed with this run's
    if not accelerator.is_main_process:  # only the main process writes
        result = _train(config, accelerator, out, out, resume_from)
    else:
        from ..checkpoint_io.staging import staging_folder

        with staging_folder(out.absolute(), force=True) as work:  # force: check_output_dir has decided
            result = _train(config, accelerator, out, work, resume_from)
        resume.start_over(out)  # the run is complete: its states are of no more use
    accelerator.wait_for_everyone()  # every process returns with the adapter (and merged model) in place
    return result


def _trainable(model, lora: LoraOptions, work: Path, base_path, fam_base_dir: Path | None, main_process: bool):
    """The module to train: the model itself with every weight trainable (`lora.full`), or its PEFT model. Returns
    (module, the folder of a PiSSA start kept for the conversion at save time or None, a description to log)."""
    from peft import get_peft_model

    if lora.full:
        model.requires_grad_(True)
        if not lora.train_embeddings:  # a tied LM head is the same tensor: frozen with them
            model.get_input_embeddings().requires_grad_(False)
            return model, None, "every weight but the token embeddings"
        return model, None, "every weight"
    peft_model = get_peft_model(model, fam_lora_config(
        model, r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
        target_modules=list(lora.target_modules) if lora.target_modules else None, train_fam_init=lora.train_fam_init,
        train_norms=lora.train_norms, init_lora_weights=PEFT_LORA_INITS[lora.init],
    ))
    adapter_config = peft_model.peft_config["default"]
    adapter_config.base_model_name_or_path = str(base_path)
    # a start that moves part of the base weights into LoRA (PiSSA) is kept for save_adapter's conversion
    lora_start = work / LORA_START_FOLDER if changes_base_weights(peft_model) and main_process else None
    if lora_start is not None:
        if fam_base_dir is not None:  # PEFT reads the base's config while converting: here it is still in `work`
            adapter_config.base_model_name_or_path = str((work / "fam_base").resolve())
        save_lora_start(peft_model, lora_start)
        adapter_config.base_model_name_or_path = str(base_path)
    settings = unwrap_fam_model(model).fam_settings
    described = (f"LoRA r={lora.r}" + ("" if lora.init == "peft" else f", {lora.init} start") + " on "
                 + module_names(adapter_config.target_modules, quote="")
                 + (" + fam_init" if lora.train_fam_init and settings.fam_length else "")
                 + (" + norms" if lora.train_norms else ""))
    return peft_model, lora_start, described


def _train(config: FinetuneConfig, accelerator, out: Path, work: Path, resume_from: Path | None) -> FinetuneResult:
    """The run behind `finetune`: files go to `work` (the main process's staging folder), paths name `out`."""
    from accelerate.utils import gather_object, set_seed
    from torch.utils.data import DataLoader
    from tqdm.auto import tqdm
    from tqdm.contrib.logging import logging_redirect_tqdm
    from transformers import get_scheduler

    t_opt = config.train
    set_seed(t_opt.seed)

    # model (+ the FAM checkpoint the adapter applies to, for a converted base), or an adapter's base
    adapter = continued.adapter_to_continue(config)
    if adapter is not None:
        model, tokenizer, base = continued.load_adapter_base(config.model.path, adapter, config.model,
                                                             device=accelerator.device)
        converted = False
    else:
        model, tokenizer, converted = load_fam_model(config.model, accelerator.device)
    base_checkpoint = converted  # a base checkpoint, converted on the fly
    if config.model.quantize:
        keep_trainable(model)  # before the passes that measure the model as given, in eval mode
    settings = model.fam_settings
    with accelerator.main_process_first():
        dataset = build_train_dataset(config.data, model, tokenizer, seed=t_opt.seed)
    if settings.fam_length > 0 and config.data.seq_len <= settings.block_size:
        logger.warning("seq_len %d <= block_size %d: every sequence is one block and the memory is never read.",
                       config.data.seq_len, settings.block_size)
    dataset, heldout_set = split_heldout(dataset, config.data.heldout, t_opt.seed)
    pad_id = getattr(tokenizer, "pad_token_id", None)
    if pad_id is None:
        pad_id = getattr(tokenizer, "eos_token_id", None) or 0
    collator = FAMDataCollator(pad_id)
    heldout = {}  # the held-out loss of the model as given, at the training start and at the end

    def measure(name, measured_model):
        what = {"given": "the model as given", "start": "the training start", "final": "the trained model"}[name]
        progress = f"held-out loss of {what}" if accelerator.is_local_main_process else None
        heldout[name] = heldout_loss(measured_model.to(accelerator.device), heldout_set, collator,
                                     t_opt.batch_size, accelerator.device, progress=progress)

    # the paper's update and content slots, where the model as given is not already so (then the adapter applies
    # to a copy saved in that start: fam_base)
    start_differs = adapter is None and not is_training_start(model, tokenizer, config.model.memory_start_text)
    if heldout_set is not None and resume_from is None and start_differs:
        measure("given", model)  # before training changes the update and the memory
    plain_text = text_check.text_ids(tokenizer, settings.block_size)
    text = {"given": None if adapter is not None else  # an adapter's model as given: below, once it is on
            text_check.text_loss(model.to(accelerator.device), plain_text, accelerator.device)}
    source_kind = "converted on the fly" if converted else "FAM"
    if start_differs:
        training_start(model, tokenizer, config.model.memory_start_text)
        if not converted:
            source_kind = "FAM, saved in the training start as fam_base"
        converted = True
    fam_base_dir = None
    if converted and not config.lora.full:  # a full run saves the whole model instead
        fam_base_dir = out / "fam_base"
        if accelerator.is_main_process:
            if config.model.quantize:  # from the source's files: the adapter applies to the unquantized weights
                write_fam_base(config.model.path, work / "fam_base", model, base_checkpoint=base_checkpoint)
            else:
                model.save_pretrained(work / "fam_base")
            if tokenizer is not None:
                tokenizer.save_pretrained(work / "fam_base")
    model_path = Path(config.model.path if adapter is None else base)
    base_path = (fam_base_dir or model_path).resolve() if fam_base_dir or model_path.exists() else str(model_path)
    logger.info("model: %s (%s%s), C=%d M=%d F=%d", config.model.path, source_kind,
                f", {config.model.quantize} weights" if config.model.quantize else "", settings.block_size,
                settings.memory_segments, settings.fam_length)

    if t_opt.gradient_checkpointing:
        enable_checkpointing(model)
    if adapter is not None:
        (target, trained_what), lora_start = continued.trainable_adapter(model, config.model.path), None
        text["given"] = text_check.text_loss(target.to(accelerator.device), plain_text, accelerator.device)
    else:
        target, lora_start, trained_what = _trainable(model, config.lora, work, base_path, fam_base_dir,
                                                      accelerator.is_main_process)
        if start_differs:
            text["start"] = text_check.text_loss(target.to(accelerator.device), plain_text, accelerator.device)
    if heldout_set is not None and resume_from is None:
        measure("start", target)
    recipe = attach_recipe(target, config.recipe)

    loader = DataLoader(dataset, batch_size=t_opt.batch_size, shuffle=True, collate_fn=collator,
                        generator=torch.Generator().manual_seed(t_opt.seed))
    params = [p for p in target.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=t_opt.learning_rate, weight_decay=t_opt.weight_decay)
    # stepped by hand once per optimizer step (accelerate's wrapper would step it once per process)
    scheduler = get_scheduler(t_opt.lr_scheduler, optimizer, num_warmup_steps=t_opt.warmup_steps,
                              num_training_steps=t_opt.max_steps)
    train_model, optimizer, loader = accelerator.prepare(target, optimizer, loader)
    train_model.train()

    logger.info("%d trainable parameters (%s); %d training sequences%s; %d process(es)",
                sum(p.numel() for p in params), trained_what, len(dataset),
                f" ({len(heldout_set)} held out)" if heldout_set is not None else "", accelerator.num_processes)
    if accelerator.is_main_process:
        (work / "finetune_config.json").write_text(json.dumps(asdict(config), indent=2, default=str))
    log_path = work / "train_log.jsonl"
    state_kwargs = dict(accelerator=accelerator, model=accelerator.unwrap_model(train_model), optimizer=optimizer,
                        scheduler=scheduler, recipe=recipe)
    counters = resume.LoopCounters()
    if resume_from is not None:
        counters = resume.restore_state(resume_from, config, log_path=log_path, **state_kwargs)
        heldout = dict(counters.heldout)
    elif heldout:
        logger.info("held-out loss at the start %.4f%s", heldout["start"],
                    f" (the model as given: {heldout['given']:.4f})" if "given" in heldout else "")

    bar = tqdm(total=t_opt.max_steps, initial=counters.step, desc="finetune", unit="step",
               disable=not accelerator.is_local_main_process)
    start = time.perf_counter() - counters.seconds
    step, batches, tokens, loss_count = counters.step, counters.batches, counters.tokens, counters.loss_count
    loss_sum = torch.tensor(counters.loss_sum, device=accelerator.device)
    # losses by how the memory started: fresh (fam_init) or passed on by Random State Passing; rows: sum, count
    by_start = torch.tensor(counters.by_start, device=accelerator.device).view(2, 2)
    final_loss, final_split, epoch, skip = counters.final_loss, counters.final_split, 0, counters.batches
    # log lines go above the bar, not onto its line (where a handler prints them: hf-fam finetune's)
    with logging_redirect_tqdm() if logging.root.handlers else contextlib.nullcontext():
        while step < t_opt.max_steps:
            if hasattr(loader, "set_epoch"):
                loader.set_epoch(epoch)
            for batch in loader:
                if skip:  # a resumed run: the data order replayed up to where its state was written
                    skip -= 1
                    continue
                batches += 1
                with accelerator.accumulate(train_model):
                    outputs = train_model(**batch, use_cache=False,
                                          **({"fam_loss_chunk": t_opt.loss_chunk} if t_opt.loss_chunk else {}))
                    accelerator.backward(outputs.loss)
                    if accelerator.sync_gradients and t_opt.max_grad_norm is not None:
                        accelerator.clip_grad_norm_(params, t_opt.max_grad_norm)
                    optimizer.step()
                    optimizer.zero_grad()
                loss_sum += outputs.loss.detach()
                loss_count += 1
                by_start[int(bool(recipe.last_draw and recipe.last_draw.used_saved_state))] += torch.stack(
                    [outputs.loss.detach().float(), torch.ones((), device=by_start.device)])
                tokens += int(batch["attention_mask"].sum())
                if not accelerator.sync_gradients:
                    continue
                scheduler.step()
                step += 1
                bar.update(1)
                if step % t_opt.log_every == 0 or step == t_opt.max_steps:
                    final_loss = accelerator.reduce(loss_sum / max(loss_count, 1), reduction="mean").item()
                    fresh, passed = (accelerator.reduce(by_start, reduction="sum") if accelerator.num_processes > 1
                                     else by_start).tolist()
                    loss_sum.zero_()
                    by_start.zero_()
                    loss_count = 0
                    elapsed = time.perf_counter() - start
                    record = {"step": step, "loss": round(final_loss, 6), "lr": scheduler.get_last_lr()[0],
                              "seconds": round(elapsed, 2), "tokens_per_s_per_process": round(tokens / elapsed, 1),
                              "state_passed": bool(recipe.last_draw and recipe.last_draw.used_saved_state),
                              "loss_fresh_memory": round(fresh[0] / fresh[1], 6) if fresh[1] else None,
                              "loss_passed_memory": round(passed[0] / passed[1], 6) if passed[1] else None}
                    bar.set_postfix(loss=f"{final_loss:.4f}")
                    final_split = [record["loss_fresh_memory"], record["loss_passed_memory"]]
                    split = split_text(*final_split)
                    logger.info("step %d/%d loss %.4f%s lr %.2e %.0f tok/s", step, t_opt.max_steps, final_loss, split,
                                record["lr"], record["tokens_per_s_per_process"])
                    if accelerator.is_main_process:
                        with log_path.open("a") as f:
                            f.write(json.dumps(record) + "\n")
                if t_opt.save_every and step % t_opt.save_every == 0 and step < t_opt.max_steps:
                    resume.save_state(out, resume.LoopCounters(step, batches, tokens, loss_sum.item(), loss_count,
                                                               time.perf_counter() - start, final_loss,
                                                               by_start.flatten().tolist(), final_split, heldout),
                                      config=config, log_path=log_path, **state_kwargs)
                if step >= t_opt.max_steps:
                    break
            epoch += 1
    bar.close()
    seconds = time.perf_counter() - start
    recipe.remove()

    # save: the adapter (LoRA + fam_init) and optionally the merged model, or the whole model of a full run
    accelerator.wait_for_everyone()
    trained = accelerator.unwrap_model(train_model)
    if heldout_set is not None:
        measure("final", trained)
        logger.info(heldout_text(heldout.get("given"), heldout.get("start"), heldout["final"], len(heldout_set)))
        worse_than(heldout)
    text["final"] = text_check.text_loss(trained, plain_text, accelerator.device)
    text_line = text_check.check(text["given"], text["final"], 0 if plain_text is None else plain_text.shape[1],
                                 start=text.get("start"))
    digests = gather_object([weights_digest(trained)])
    if len(set(digests)) > 1:
        logger.warning("trained weights differ between processes: %s", digests)
    merged_dir = out / "merged" if t_opt.merge else None
    result_model = trained
    if accelerator.is_main_process:
        summary = {"steps": step, "final_loss": final_loss, "final_loss_fresh_memory": final_split[0],
                   "final_loss_passed_memory": final_split[1], "heldout_sequences": len(heldout_set or []),
                   "heldout_loss": heldout, "text_loss": text, "seconds": round(seconds, 2),
                   "world_size": accelerator.num_processes, "adapter_digests": digests,
                   "trained": trained_what if config.lora.full else "LoRA",
                   "base_model": str(base_path), "merged": str(merged_dir.resolve()) if merged_dir else None,
                   "quantized": config.model.quantize,
                   **({"continued_from": config.model.path} if adapter is not None else {})}
        result_model = save_run(trained, tokenizer, work, out=out, full=config.lora.full, base_path=base_path,
                                fam_base_dir=fam_base_dir, lora_start=lora_start, merged_dir=merged_dir,
                                summary=summary, card_source=config.model.path,
                                merge_base=_unquantized_base(config.model, work, fam_base_dir, base_path))
    return FinetuneResult(output_dir=out, steps=step, final_loss=final_loss, seconds=seconds,
                          world_size=accelerator.num_processes, adapter_digests=digests, merged_dir=merged_dir,
                          fam_base_dir=fam_base_dir, model=result_model, final_loss_fresh_memory=final_split[0],
                          final_loss_passed_memory=final_split[1], heldout_losses=heldout,
                          heldout_sequences=len(heldout_set or []), text_line=text_line)


def _unquantized_base(options: ModelOptions, work: Path, fam_base_dir: Path | None, base_path):
    """For a run on quantized weights, what loads the unquantized base its adapter merges into (`--merge`):
    merging into 4- or 8-bit weights would round the merged model. None for a run in full precision."""
    if not options.quantize:
        return None
    from ..runtime.loading import load_fam_model as load

    return lambda: load(str(work / "fam_base" if fam_base_dir is not None else base_path), dtype=options.dtype)[0]


__all__ = ["DataOptions", "FinetuneConfig", "FinetuneResult", "LoraOptions", "ModelOptions", "TrainOptions",
           "adapter_digest", "build_train_dataset", "check_output_dir", "enable_checkpointing", "finetune",
           "load_fam_model", "weights_digest"]
