"""The recipe's state in the HF `Trainer`'s checkpoints: `FAMRecipeCallback`.

`trainer.train(resume_from_checkpoint=...)` restores the weights, optimizer, schedule, random generators and data
position, but not what the recipe (`attach_recipe`) carries from step to step: its own generator and the FAM state
Random State Passing would pass on. Without them a resumed run starts the recipe's draws again and its first step
from a fresh memory. With this callback each checkpoint also holds `fam_recipe_state_<process>.pt`, read back when a
run resumes, and the resumed run ends with the weights of the uninterrupted one (tested).

Example:
```python
>>> recipe = attach_recipe(peft_model, FAMRecipeConfig())
>>> trainer = Trainer(model=peft_model, args=args, train_dataset=data, callbacks=[FAMRecipeCallback(recipe)])
>>> trainer.train(resume_from_checkpoint=True)   # or a checkpoint folder
```
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from transformers import TrainerCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

logger = logging.getLogger("hf_fam.training")

STATE_FILE = "fam_recipe_state_{process}.pt"


class FAMRecipeCallback(TrainerCallback):
    """Save `recipe`'s state with every Trainer checkpoint and load it when training resumes from one."""

    def __init__(self, recipe):
        self.recipe = recipe

    def on_save(self, args, state, control, **kwargs):
        folder = Path(args.output_dir) / f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}"
        folder.mkdir(parents=True, exist_ok=True)
        torch.save(self.recipe.state_dict(), folder / STATE_FILE.format(process=args.process_index))

    def on_train_begin(self, args, state, control, **kwargs):
        if state.global_step == 0:
            return  # a run from the start
        # Trainer does not tell callbacks where it resumed from: its own checkpoints are named by their step
        candidates = [Path(args.output_dir) / f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}"]
        if isinstance(args.resume_from_checkpoint, str):
            candidates.insert(0, Path(args.resume_from_checkpoint))
        for folder in candidates:
            path = folder / STATE_FILE.format(process=args.process_index)
            if path.is_file():
                self.recipe.load_state_dict(torch.load(path, weights_only=True), device=args.device)
                return
        logger.warning("resumed at step %d without the FAM recipe's state (no %s in %s): the recipe's draws start "
                       "again and the next step starts from a fresh memory", state.global_step,
                       STATE_FILE.format(process=args.process_index), candidates[-1])


__all__ = ["FAMRecipeCallback"]
