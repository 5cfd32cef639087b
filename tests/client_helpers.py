"""Tiny FAM checkpoints with a tokenizer, saved in a folder, for the client tests (TRL, Trainer, pipeline,
lm-evaluation-harness, accelerate, device_map): the clients load them as a user would, by path."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import hf_fam
from hf_fam.checkpoint_io.convert import ConvertOptions, convert
from hf_fam.tiny import make_tiny_checkpoint

# C = 8, M = 1: a window of 16 tokens, so the test texts (40-300 tokens) are many blocks long
SETTINGS = dict(block_size=8, memory_segments=1, fam_length=4)

TEXTS = [
    "the quick brown fox jumps over the lazy dog",
    "a feedback attention memory reads long input block by block",
    "lorem ipsum dolor sit amet, consectetur adipiscing elit, sed do eiusmod",
    "pack my box with five dozen liquor jugs",
    "how vexingly quick daft zebras jump",
    "sphinx of black quartz, judge my vow; the five boxing wizards jump quickly",
    "one two three four five six seven eight nine ten eleven twelve",
    "working memory lets a transformer carry information past its attention window",
]


def tiny_base(folder: Path, family: str = "llama", seed: int = 0, sharpen: float = 4.0, **overrides) -> Path:
    """A tiny random `family` checkpoint with the byte-level tokenizer (vocab 259), its query/key projections
    scaled by `sharpen` so that attention (and so the window FAM imposes) matters for the logits."""
    path = make_tiny_checkpoint(folder, family=family, seed=seed, **overrides)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.q_proj.weight.mul_(sharpen)
            layer.self_attn.k_proj.weight.mul_(sharpen)
    model.save_pretrained(path)
    return path


def fam_checkpoint(folder: Path, family: str = "llama", route: str = "saved", seed: int = 0, **overrides) -> Path:
    """A FAM checkpoint with its tokenizer in `folder`.

    route "saved": the base loaded and wrapped with `FAMForCausalLM.from_base_model`, then `save_pretrained`;
    route "converted": `hf_fam.checkpoint_io.convert` of the base folder.
    `overrides`: FAM settings and base-config fields.
    """
    folder = Path(folder)
    settings = {k: overrides.pop(k) if k in overrides else v for k, v in SETTINGS.items()}
    base = tiny_base(folder.parent / f"{folder.name}-base", family=family, seed=seed, **overrides)
    if route == "converted":
        convert(base, folder, ConvertOptions(**settings, seed=seed, progress=False))
    elif route == "saved":
        model = hf_fam.FAMForCausalLM.from_base_model(AutoModelForCausalLM.from_pretrained(base), **settings)
        torch.manual_seed(seed)
        with torch.no_grad():
            model.fam.fam_init.normal_(0.0, 1.0)  # a memory far from zero, so FAM changes the logits
        model.save_pretrained(folder)
        AutoTokenizer.from_pretrained(base).save_pretrained(folder)
    else:
        raise ValueError(f"route must be 'saved' or 'converted', got {route!r}")
    return folder


def base_folder(fam_folder: Path) -> Path:
    """The base checkpoint `fam_checkpoint` made next to `fam_folder`."""
    fam_folder = Path(fam_folder)
    return fam_folder.parent / f"{fam_folder.name}-base"


def trained_lora(folder: Path, task_type: str | None = None):
    """A LoRA PeftModel of the FAM checkpoint in `folder` whose adapter changes the logits, as training leaves one
    (LoRA's B not zero, `fam_init` trained in full via modules_to_save); in eval mode. `task_type` None is how
    many examples write a LoraConfig."""
    from peft import LoraConfig, get_peft_model

    model = AutoModelForCausalLM.from_pretrained(folder)
    peft = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj", "down_proj"],
                                            modules_to_save=["fam"], init_lora_weights=False, task_type=task_type))
    with torch.no_grad():
        peft.base_model.model.fam.modules_to_save.default.fam_init.add_(0.5)
    return peft.eval()


def completion_logps(model, ids, attention, completion):
    """The sum of log-probabilities of the completion tokens of each row (right padding), each row read alone by
    `model` with its padding cut off: what a preference trainer's loss must be built from."""
    sums = []
    for row_ids, row_attention, row_completion in zip(ids, attention, completion):
        length = int(row_attention.sum())  # right padding: the real tokens come first
        row_ids, row_completion = row_ids[:length], row_completion[:length]
        with torch.no_grad():
            logps = model(input_ids=row_ids[None], use_cache=False).logits[0, :-1].float().log_softmax(-1)
        token_logps = logps.gather(-1, row_ids[1:, None])[:, 0]
        sums.append((token_logps * row_completion[1:]).sum())
    return torch.stack(sums)


def recording_trainer(trainer_class, direct_loss):
    """A subclass of a TRL preference trainer that records, at every step, the batch, the loss the trainer
    optimises and `direct_loss(peft_model, batch)`: the same loss recomputed from the FAM model's logits (the
    model in eval mode: the trainer's forward ran without dropout, lora_dropout 0)."""

    class Recording(trainer_class):
        records: list

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            batch = {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in inputs.items()}
            loss = super().compute_loss(model, inputs, return_outputs=return_outputs,
                                        num_items_in_batch=num_items_in_batch)
            trained = loss[0] if isinstance(loss, tuple) else loss
            peft_model = self.accelerator.unwrap_model(model)
            was_training = peft_model.training
            peft_model.eval()
            try:
                direct = direct_loss(peft_model, batch)
            finally:
                peft_model.train(was_training)
            self.records.append(dict(batch=batch, trained=trained.detach().float().item(), direct=direct.item()))
            return loss

    Recording.__name__ = f"Recording{trainer_class.__name__}"
    return Recording


def assert_trained_on_fam(trainer, fam_init, fam_folder):
    """After a preference trainer's run: `fam_init` trained, and the log-probabilities of its last batch tell the
    FAM model from the plain base (a route that skipped FAM would have read the plain model's, against FAM's
    reference)."""
    from hf_fam.training import unwrap_fam_model

    trained_init = unwrap_fam_model(trainer.model).fam.modules_to_save["default"].fam_init
    assert (trained_init.detach() - fam_init).abs().max() > 1e-4  # the memory trained
    base = AutoModelForCausalLM.from_pretrained(base_folder(fam_folder), dtype=torch.float32).eval()
    batch = trainer.records[-1]["batch"]
    rows = batch["input_ids"], batch["attention_mask"], batch["completion_mask"]
    plain = completion_logps(base, *rows)
    peft_model = trainer.model.eval()
    with peft_model.disable_adapter():
        reference = completion_logps(peft_model, *rows)
    assert (plain - reference).abs().max() > 1e-2


def client_lora():
    """The LoRA config the TRL client tests give their trainers: a few projections, `fam_init` trained in full, no
    dropout (so that a forward outside the trainer reads the same model)."""
    from peft import LoraConfig

    return LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "v_proj", "down_proj"],
                      modules_to_save=["fam"], task_type="CAUSAL_LM")


def card_snippet_logits(folder: Path, tokenizer_from: Path, inputs: dict,
                        tmp_path: Path) -> tuple[str, str, torch.Tensor]:
    """The model card of the FAM checkpoint in `folder`, and the class of the model its usage snippet loads and the
    logits it gives for `inputs` (`input_ids`, `attention_mask`), the snippet run as written where hf_fam is not
    installed (the checkpoint's own code). The tokenizer the snippet loads is copied in from `tokenizer_from`."""
    import re

    from convert_helpers import run_without_hf_fam

    from hf_fam.checkpoint_io.cards import CardInfo, render_model_card

    card = render_model_card(folder, CardInfo(repo_id=str(folder)))
    (snippet,) = re.findall(r"```python\n(.*?)```", card, flags=re.S)
    torch.save(inputs, tmp_path / "inputs.pt")
    script = snippet + f"""
inputs = torch.load({str(tmp_path / "inputs.pt")!r})
with torch.no_grad():
    torch.save(model.eval()(**inputs).logits, {str(tmp_path / "remote.pt")!r})
print("class", type(model).__name__)
"""
    AutoTokenizer.from_pretrained(tokenizer_from).save_pretrained(folder)
    result = run_without_hf_fam("import torch\n" + script, tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    return card, result.stdout.split("class ")[-1].strip(), torch.load(tmp_path / "remote.pt")


def check_classifier_lora(folder: Path, auto_class, task_type: str, inputs: dict, labels: torch.Tensor,
                          tmp_path: Path, logits_mask: torch.Tensor | None = None):
    """LoRA on the FAM classifier checkpoint in `folder` (loaded with `auto_class`): `fam_lora_config` gives PEFT's
    `task_type`, training reaches `score` and `fam_init`, and the saved adapter reloaded by PEFT and the merged model
    give the live adapter's logits (1e-5, at `logits_mask`). Returns the merged model."""
    import peft
    from conftest import assert_close

    from hf_fam.training.lora import fam_lora_config

    model = auto_class.from_pretrained(folder, dtype=torch.float32)
    config = fam_lora_config(model, r=4, init_lora_weights=False)
    assert config.task_type == task_type
    peft_model = peft.get_peft_model(model, config)
    peft_model.train()
    peft_model(**inputs, labels=labels).loss.backward()
    trained = {n for n, p in peft_model.named_parameters() if p.grad is not None}
    assert any("score.modules_to_save" in n for n in trained) and any("fam.modules_to_save" in n for n in trained)
    with torch.no_grad():
        peft_model.base_model.model.score.modules_to_save.default.weight.add_(0.5)
    peft_model.eval()
    with torch.no_grad():
        unmerged = peft_model(**inputs).logits
    peft_model.save_pretrained(tmp_path / "adapter")
    peft_class = getattr(peft, "AutoPeft" + auto_class.__name__.removeprefix("Auto"))
    reloaded = peft_class.from_pretrained(tmp_path / "adapter", dtype=torch.float32)
    merged = peft_model.merge_and_unload()
    with torch.no_grad():
        assert_close(reloaded.eval()(**inputs).logits, unmerged, mask=logits_mask, msg="saved adapter = live")
        assert_close(merged(**inputs).logits, unmerged, mask=logits_mask, msg="merged = unmerged")
    return merged


def normalised(num_items_in_batch) -> dict:
    """The forward keywords that give a model's loss the normalisation a Trainer step used: the sum over counted
    tokens divided by the `num_items_in_batch` it passed (transformers 5.8 counts the labels before
    the shift, one token per row more than the loss counts), or the mean where it passed none."""
    return {} if num_items_in_batch is None else {"num_items_in_batch": num_items_in_batch}
