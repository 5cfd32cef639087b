"""`hf-fam demo`: show on a laptop CPU that FAM remembers what a sliding window forgets.

Synthetic passkey retrieval (`KEY d1..d5 ENDK` hidden in random filler, `QRY d1..d5` at the end), on tiny
Llama models, following the paper's route:

1. **Short-context model.** A tiny Llama with ordinary full attention learns the task on 64-token sequences
   (one attention window), where the key is always in view. This is the "pretrained model" the paper
   starts from; it is trained once and shared by both contenders. Two learning rates race from the same
   initial weights and the first to get there wins (see `pretrain`): with a single rate, some seed always
   stalled near 0.9 exact match, and both fine-tuned models then started weak.
2. **Convert and fine-tune, side by side.** The model is wrapped twice, as FAM (F memory tokens per layer)
   and as BSWA (block sliding window attention: the same C and M, F = 0), and each copy is fine-tuned with
   the same data, schedule and number of steps on longer sequences (an adaptive length curriculum), one
   process and one CPU core each. All weights are trained (the model is tiny: LoRA would leave nothing
   out); `hf-fam finetune` shows LoRA on real checkpoints.
3. **Evaluate** both at 1x to 16x the attention window C·(M+1), overall and *beyond reach*: keys further
   back than L·M blocks, which BSWA cannot see by construction.

Why this route rather than training each model from scratch: learning in-window retrieval (an induction
circuit) takes a tiny model 800 to 2,300 steps, with much variance, and is the same work for both models;
done once with cheap full attention it takes 1 to 4 minutes, and the fine-tuning budget goes to what
differs, the memory. Half of the fine-tuning examples put the key beyond reach of the query (anywhere more
than L·M blocks back), a quarter in the last window and a quarter anywhere, and a fifth of the batches are
short (one window), so that both memory and direct retrieval keep being trained. (Far keys only in the first
block, as first tried, invite a shortcut: with seed 2 the model learned to keep the first block only, 26 %
beyond reach at 4x the window; far keys anywhere beyond reach gave 90 % with the same seed and budget.)

The modules, in the order the demo runs: `config` (DemoConfig), `data` (the batches), `model` (the tiny Llama
and its wrappers), `training` (schedule and loop), `steps` (the pretraining race, fine-tuning and evaluation
in processes), `report` (checkpoint, tables) and `run` (`run_demo`, end to end).
"""

from __future__ import annotations

from ..._lazy import lazy_exports

# name -> the module that defines it; loaded on first use (PEP 562), so that `hf-fam demo --help` reads the
# defaults from `config` without importing torch
_EXPORTS = {
    "DemoConfig": ".config", "full_config": ".config", "VOCAB": ".data", "make_batch": ".data",
    "build_base": ".model", "build_model": ".model", "format_table": ".report", "require_matplotlib": ".report",
    "save_checkpoint": ".report", "summarize_seeds": ".report", "run_demo": ".run", "evaluate": ".steps",
    "pretrain": ".steps", "train": ".training",
}

__all__ = sorted(_EXPORTS)


__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
