"""The paper's training recipe (Appendix B.2): Random State Passing and Random Position Offset.

Both are *training-only* tricks. They are applied by a `FAMTrainingRecipe` attached to the model the training
loop calls (a FAM model, its PeftModel, ...): a forward pre-hook adds the two FAM forward arguments to every
forward made in training mode, and a forward hook keeps the final memory. Nothing else changes, so the recipe
works the same with the HF `Trainer`, with accelerate and with a plain PyTorch loop, and `model.eval()` switches
it off. Its random draws use a generator of its own: the global RNG (dropout, data shuffling) is untouched.

**Random State Passing (RSP, B.2.3).** A model trained on sequences of a few blocks would otherwise only ever
see its memory updated a few times, and has to extrapolate at inference to hundreds of updates. RSP keeps the
final FAM of each training forward (row 0's, per layer: (1, F, D) each, None for layers without memory) and,
with probability `state_passing_prob` (paper: 0.8), starts the next forward from it (`fam_state=`, shared by all
rows) instead of from the forward-propagated `fam_init`. The state is *detached*: it was computed with the weights
of a previous optimizer step, whose graph is gone; gradients flow through the memory across all blocks of the current
sequence only. A step that starts from a saved state does not use `fam_init`, so `fam_init` gets no gradient
then: under DDP use `find_unused_parameters=True` (`Trainer`: `ddp_find_unused_parameters=True`).
With gradient accumulation the state is passed from one micro-batch to the next; under DDP every process keeps
its own (row 0 of its own batch); the draws are the same on every process for the same seed.

**Random Position Offset (RPO, B.2.2).** Each row gets an integer offset added to all of its positions: zero
half of the time (`position_offset_prob`, paper 0.5), otherwise uniform in [0, max_position_offset), by default
the largest RoPE wavelength 2π·rope_theta (≈ 62.8k tokens for θ = 10,000). The paper needs this because in its
implementation the memory carries absolute positions that grow with the stream. **In hf_fam every block is
computed in its own position frame** (see `hf_fam.modeling.fam_core`): positions never exceed (M+1)·C, and
attention depends on relative positions only, so an offset changes nothing but float rounding of the rotary
angles (measured on tiny fp32 models: logits move by < 1e-4 for θ = 10,000, ~1e-3 for θ = 500,000). RPO is
provided for fidelity to the paper and costs nothing; do not expect it to change results here.

Example:
```python
>>> recipe = attach_recipe(peft_model, FAMRecipeConfig(state_passing_prob=0.8, position_offset_prob=0.5))
>>> trainer = Trainer(model=peft_model, args=args, train_dataset=data)   # or any training loop
>>> trainer.train()
>>> recipe.remove()
```
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from .lora import unwrap_fam_model
from .options import (  # noqa: F401  (declared with the other training options; re-exported)
    DEFAULT_POSITION_OFFSET_PROB,
    DEFAULT_STATE_PASSING_PROB,
    FAMRecipeConfig,
)


def max_rope_wavelength(model: nn.Module) -> int:
    """The largest RoPE wavelength of a (FAM) model, 2π·rope_theta, in whole tokens.

    Reads `rope_parameters` (transformers 5; per layer type for Gemma 3, the largest θ wins) or `rope_theta`;
    falls back to 2π / min(inv_freq) of the rotary embedding.
    """
    fam_model = unwrap_fam_model(model)
    config = fam_model.config
    config = getattr(config, "base_config", None) or config
    thetas = []
    params = getattr(config, "rope_parameters", None)
    if isinstance(params, dict):
        if "rope_theta" in params:
            thetas.append(params["rope_theta"])
        thetas += [p["rope_theta"] for p in params.values() if isinstance(p, dict) and "rope_theta" in p]
    if getattr(config, "rope_theta", None) is not None:
        thetas.append(config.rope_theta)
    if thetas:
        return int(2 * math.pi * max(float(t) for t in thetas))
    inv_freq = fam_model.get_decoder().rotary_emb.inv_freq
    return int(2 * math.pi / inv_freq.float().min().item())


@dataclass
class RecipeDraw:
    """What the recipe decided for one training forward."""

    used_saved_state: bool
    position_offset: torch.Tensor | None  # (B,) long, or None when RPO is off


class FAMTrainingRecipe:
    """Applies Random State Passing and Random Position Offset to the training forwards of a model.

    Prefer `attach_recipe(model, config)`. `draw`, `forward_kwargs` and `observe` are public for loops that call
    `model.forward` directly (which bypasses hooks): pass `**recipe.forward_kwargs(recipe.draw(batch_size))` to the
    forward, then `recipe.observe(outputs)`.

    Attributes:
        saved_state: the FAM state RSP would start the next forward from: a list of (1, F, D) tensors per layer,
            detached, or None before the first training forward.
        last_draw: the `RecipeDraw` of the latest training forward.
        forwards: training forwards seen so far.
    """

    def __init__(self, model: nn.Module, config: FAMRecipeConfig | None = None):
        self.config = config or FAMRecipeConfig()
        self.model = model
        fam_model = unwrap_fam_model(model)  # ValueError for non-FAM models
        self.fam_length = fam_model.fam_settings.fam_length
        self.max_offset = self.config.max_position_offset or max_rope_wavelength(fam_model)
        self.generator = torch.Generator().manual_seed(self.config.seed)
        self.saved_state: list[torch.Tensor] | None = None
        self.last_draw: RecipeDraw | None = None
        self.forwards = 0
        self._handles: list = []

    # --- the two tricks ------------------------------------------------------------------------------
    def draw(self, batch_size: int) -> RecipeDraw:
        """Decide state passing (one coin for the batch) and offsets (one per row) for the next forward."""
        c = self.config
        use_saved = False
        if c.state_passing_prob > 0 and self.fam_length > 0:
            coin = torch.rand((), generator=self.generator).item()
            use_saved = self.saved_state is not None and coin < c.state_passing_prob
        offset = None
        if c.position_offset_prob > 0:
            # paper listing: offset = uniform([b], maxval=wavelen) * round(uniform([b])); integer offsets here
            value = torch.randint(0, self.max_offset, (batch_size,), generator=self.generator)
            keep = torch.rand(batch_size, generator=self.generator) < c.position_offset_prob
            offset = value * keep
        self.last_draw = RecipeDraw(use_saved, offset)
        return self.last_draw

    def forward_kwargs(self, draw: RecipeDraw, device: torch.device | str | None = None) -> dict:
        """The FAM forward arguments (`fam_state`, `fam_position_offset`) that realise a draw."""
        kwargs = {}
        if draw.used_saved_state:
            kwargs["fam_state"] = self.saved_state
        if draw.position_offset is not None:
            kwargs["fam_position_offset"] = draw.position_offset.to(device)
        return kwargs

    def observe(self, outputs) -> None:
        """Keep row 0's final FAM of a training forward (detached) for the next one."""
        self.forwards += 1
        if self.config.state_passing_prob <= 0:
            return
        state = outputs.get("fam_state") if hasattr(outputs, "get") else getattr(outputs, "fam_state", None)
        if state is not None:
            # detached: it starts a later step, after an optimizer update; its own graph is freed
            # (layers without a memory, fam_layers="global", hold None)
            self.saved_state = [None if s is None else s[:1].detach() for s in state]

    # --- hooks ---------------------------------------------------------------------------------------
    def _pre_hook(self, module, args, kwargs):
        if not module.training or not self.config.enabled:
            return None
        if "fam_state" in kwargs or "fam_position_offset" in kwargs:
            return None  # the caller decides
        if kwargs.get("cache") is not None or kwargs.get("past_key_values") is not None:
            return None  # a stream continued from a cache is not a fresh training sequence
        ref = kwargs.get("input_ids", args[0] if args else None)
        if ref is None:
            ref = kwargs.get("inputs_embeds")
        if ref is None:
            return None
        draw = self.draw(ref.shape[0])
        kwargs = {**kwargs, **self.forward_kwargs(draw, ref.device)}
        return args, kwargs

    def _hook(self, module, args, kwargs, outputs):
        if module.training:
            self.observe(outputs)
        return outputs

    def attach(self) -> FAMTrainingRecipe:
        """Register the hooks on `self.model` (idempotent)."""
        if not self._handles:
            self._handles = [
                self.model.register_forward_pre_hook(self._pre_hook, with_kwargs=True),
                self.model.register_forward_hook(self._hook, with_kwargs=True),
            ]
        return self

    def remove(self) -> None:
        """Remove the hooks; the model behaves as without the recipe."""
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def reset(self) -> None:
        """Forget the saved state (e.g. between training runs)."""
        self.saved_state = None
        self.last_draw = None

    # --- resuming ------------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """What the next draws depend on (the generator, the state RSP would pass, the forwards counted), to
        continue an interrupted run exactly (`load_state_dict`)."""
        return {"generator": self.generator.get_state(), "forwards": self.forwards,
                "saved_state": None if self.saved_state is None else [
                    None if s is None else s.detach().cpu() for s in self.saved_state]}

    def load_state_dict(self, state: dict, device: torch.device | str | None = None) -> None:
        """Continue from `state_dict()`'s output; the passed state moves to `device`."""
        self.generator.set_state(state["generator"])
        self.forwards = state["forwards"]
        saved = state["saved_state"]
        self.saved_state = None if saved is None else [None if s is None else s.to(device) for s in saved]
        self.last_draw = None


def attach_recipe(model: nn.Module, config: FAMRecipeConfig | None = None) -> FAMTrainingRecipe:
    """Apply Random State Passing and Random Position Offset to every training-mode forward of `model`.

    Args:
        model: a FAMForCausalLM, a patched model, or a PeftModel of one (attach once: to the PeftModel or to
            the FAM model inside it, not both). DDP/accelerate wrappers around it are fine: they call it.
        config: the options; paper defaults when None.

    Returns:
        The attached `FAMTrainingRecipe` (`.remove()` detaches it).

    Example:
    ```python
    >>> recipe = attach_recipe(peft_model, FAMRecipeConfig(state_passing_prob=0.8))
    >>> loss = peft_model(input_ids=ids, labels=ids).loss   # in train mode: fam_state / offsets added
    ```
    """
    return FAMTrainingRecipe(model, config).attach()


__all__ = ["FAMRecipeConfig", "FAMTrainingRecipe", "RecipeDraw", "attach_recipe", "max_rope_wavelength"]
