"""Per-family adapters: where a decoder keeps its layers, embeddings and rotary embedding, and what differs.

The FAM computation in `fam_core` is written once. It runs every sub-layer through the checkpoint's own
modules; what it needs to know about an architecture is small, and lives here:

- where the decoder stack, its layers, token embedding and rotary embedding are;
- how token embeddings are scaled (Gemma multiplies by sqrt(hidden) inside its embedding module);
- the rotary frequencies of a layer, so that cached keys can be moved to another block's frame;
- the projection names LoRA should target.

Adding a family means adding an entry to `ADAPTERS` (or a subclass of `DecoderAdapter` when the family
differs in one of the points above) and one entry in the parametrised tests.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

ATTENTION_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP_PROJECTIONS = ("gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class DecoderAdapter:
    """What FAM needs to know about one decoder family (Llama and the families shaped like it)."""

    model_type: str
    lora_target_modules: tuple[str, ...] = ATTENTION_PROJECTIONS + MLP_PROJECTIONS
    # a mixture of experts: checkpoints store each expert's weights apart, and transformers fuses them into
    # one tensor per layer while loading (so `hf-fam convert`, which copies tensors as stored, cannot)
    experts: bool = False
    # rotary embedding on interleaved channel pairs (0, 1), (2, 3), ... (Cohere, GLM-4, Helium) instead of halves
    interleaved_rotary: bool = False

    # --- where things are ---------------------------------------------------------------------------
    def decoder(self, model: nn.Module) -> nn.Module:
        """The decoder stack (`LlamaModel`, ...) of a causal LM, or the stack itself."""
        return model.model if hasattr(model, "model") and hasattr(model.model, "layers") else model

    def layers(self, decoder: nn.Module) -> nn.ModuleList:
        return decoder.layers

    def embed_scale(self, decoder: nn.Module) -> torch.Tensor | float:
        """The factor token embeddings are multiplied by before the first layer: the embedding module's own
        (Gemma), else the decoder's `embedding_multiplier` (Granite applies it in its forward), else 1."""
        embed = decoder.embed_tokens
        scale = getattr(embed, "embed_scale", None)
        if scale is None:
            return getattr(decoder.config, "embedding_multiplier", 1.0)
        return scale.to(embed.weight.dtype) if isinstance(scale, torch.Tensor) else scale

    # --- positions ----------------------------------------------------------------------------------
    def layer_type(self, decoder: nn.Module, layer_idx: int) -> str | None:
        """The checkpoint's attention type of a layer ("full_attention", "sliding_attention") or None."""
        types = getattr(decoder.config, "layer_types", None)
        return types[layer_idx] if types else None

    def is_global_layer(self, decoder: nn.Module, layer_idx: int) -> bool:
        """Whether the checkpoint runs this layer with full (not sliding-window) attention."""
        kind = self.layer_type(decoder, layer_idx)
        if kind is None:
            return getattr(decoder.config, "sliding_window", None) is None
        return kind == "full_attention"

    def position_embeddings(self, decoder: nn.Module, hidden: torch.Tensor, position_ids: torch.Tensor, layer_idx: int):
        """What the decoder passes layer `layer_idx` as `position_embeddings` for these positions."""
        return decoder.rotary_emb(hidden, position_ids)

    def uses_rope(self, decoder: nn.Module, layer_idx: int) -> bool:
        """Whether layer `layer_idx` rotates its queries and keys (False: a NoPE layer)."""
        return True

    def inv_freq(self, decoder: nn.Module, layer_idx: int) -> torch.Tensor:
        """Rotary inverse frequencies used by layer `layer_idx` (length rotary_dim / 2). Zeros for a NoPE
        layer: moving its keys to another block's frame is then the identity, as it must be."""
        freq = self.rotary_inv_freq(decoder, layer_idx)
        if self.uses_rope(decoder, layer_idx):
            return freq
        # one zero tensor per decoder, kept: callers cache rotations by the frequencies' identity
        zeros = decoder.__dict__.get("_fam_nope_inv_freq")
        if zeros is None or zeros.shape != freq.shape:
            zeros = decoder.__dict__["_fam_nope_inv_freq"] = torch.zeros_like(freq)
        return zeros

    def rotary_inv_freq(self, decoder: nn.Module, layer_idx: int) -> torch.Tensor:
        """The inverse frequencies of the rotary embedding layer `layer_idx` is given."""
        return decoder.rotary_emb.inv_freq

    # --- what a checkpoint may not do under FAM -----------------------------------------------------
    def check_config(self, config) -> None:
        """Raise if the base config uses something FAM cannot reproduce exactly."""


def rotate_half(x: torch.Tensor, interleaved: bool = False) -> torch.Tensor:
    """The rotation's partner channels: (-x2, x1) of the two halves, or of each interleaved pair."""
    if interleaved:
        return torch.stack((-x[..., 1::2], x[..., 0::2]), dim=-1).flatten(-2)
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def relative_rotation(inv_freq: torch.Tensor, deltas: list[int], device, dtype=torch.float32,
                      interleaved: bool = False):
    """cos/sin, shape (len(deltas), rotary_dim), of a pure rotation by `deltas` positions, laid out for
    the family's channel pairing (`interleaved`: pairs (0, 1), (2, 3), ...; else the two halves).

    Angles are computed in float64: they move cached keys between block frames and must not add the
    rounding error that large absolute positions suffer in float32.
    """
    d = torch.tensor(deltas, dtype=torch.float64, device=device)
    angles = d[:, None] * inv_freq.to(device=device, dtype=torch.float64)[None, :]  # (len, rot/2)
    emb = angles.repeat_interleave(2, dim=-1) if interleaved else torch.cat((angles, angles), dim=-1)  # (len, rot)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rotation(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleaved: bool = False) -> torch.Tensor:
    """Rotate the rotary part of `x` (the first cos.shape[-1] channels) by (cos, sin) from `relative_rotation`
    with the same `interleaved`; keep the rest."""
    rot = cos.shape[-1]
    x32 = x.float()
    if rot == x.shape[-1]:
        out = x32 * cos + rotate_half(x32, interleaved) * sin
    else:
        x_rot, x_pass = x32[..., :rot], x32[..., rot:]
        out = torch.cat((x_rot * cos + rotate_half(x_rot, interleaved) * sin, x_pass), dim=-1)
    return out.to(x.dtype)


@dataclass(frozen=True)
class PerLayerTypeRopeAdapter(DecoderAdapter):
    """Gemma 3, OLMo 3: one rotary embedding per layer type (local layers may use another base frequency).
    Older transformers (5.4) give OLMo 3 one rotary embedding for all layers: then it is used as such."""

    def _per_type_freq(self, decoder, layer_idx) -> torch.Tensor | None:
        return getattr(decoder.rotary_emb, f"{self.layer_type(decoder, layer_idx)}_inv_freq", None)

    def position_embeddings(self, decoder, hidden, position_ids, layer_idx):
        if self._per_type_freq(decoder, layer_idx) is None:
            return super().position_embeddings(decoder, hidden, position_ids, layer_idx)
        return decoder.rotary_emb(hidden, position_ids, self.layer_type(decoder, layer_idx))

    def rotary_inv_freq(self, decoder, layer_idx):
        freq = self._per_type_freq(decoder, layer_idx)
        return super().rotary_inv_freq(decoder, layer_idx) if freq is None else freq


@dataclass(frozen=True)
class NoRopeLayersAdapter(DecoderAdapter):
    """SmolLM3: the layers `config.no_rope_layers` marks 0 use no rotary embedding (NoPE)."""

    def uses_rope(self, decoder, layer_idx):
        return bool(decoder.config.no_rope_layers[layer_idx])


@dataclass(frozen=True)
class GlobalNoRopeAdapter(DecoderAdapter):
    """EXAONE 4: with sliding-window layers, the full-attention layers use no rotary embedding (NoPE)."""

    def uses_rope(self, decoder, layer_idx):
        return getattr(decoder.config, "sliding_window", None) is None or not self.is_global_layer(decoder, layer_idx)


@dataclass(frozen=True)
class SlidingRopeOnlyAdapter(DecoderAdapter):
    """Cohere 2: only the sliding-window layers use a rotary embedding; the full-attention ones are NoPE."""

    def uses_rope(self, decoder, layer_idx):
        windowed = getattr(decoder.config, "sliding_window", None) is not None
        return windowed and not self.is_global_layer(decoder, layer_idx)


ADAPTERS: dict[str, DecoderAdapter] = {
    "llama": DecoderAdapter("llama"),
    # main diff with Llama: its own sliding window is replaced by the FAM block window; the attention
    # function simply drops the `sliding_window` argument.
    "mistral": DecoderAdapter("mistral"),
    # main diff with Llama: embeddings scaled by sqrt(hidden) inside GemmaTextScaledWordEmbedding, which
    # `embed_scale` reads from the module.
    "gemma": DecoderAdapter("gemma"),
    # main diff with Gemma: post-attention and pre/post-feedforward norms (run by its own layer), attention
    # logit soft-capping (its eager attention function), interleaved sliding/full layers (see fam_layers)
    "gemma2": DecoderAdapter("gemma2"),
    # main diff with Gemma 2: q/k norms, one rotary embedding per layer type
    "gemma3_text": PerLayerTypeRopeAdapter("gemma3_text"),
    # main diff with Llama: q/k/v biases; optional sliding-window layers (see fam_layers)
    "qwen2": DecoderAdapter("qwen2"),
    # main diff with Qwen 2: q/k norms
    "qwen3": DecoderAdapter("qwen3"),
    # main diff with Llama: fused qkv_proj and gate_up_proj (LoRA targets), optional partial rotary
    "phi3": DecoderAdapter("phi3", lora_target_modules=("qkv_proj", "o_proj", "gate_up_proj", "down_proj")),
    # main diff with Llama: optional sliding-window layers (see fam_layers)
    "ministral": DecoderAdapter("ministral"),
    # main diff with Llama: a mixture of experts as the MLP, whose experts are not Linear modules (LoRA
    # targets the attention); router logits (and the auxiliary loss) come from the blocks' tokens
    "mixtral": DecoderAdapter("mixtral", lora_target_modules=ATTENTION_PROJECTIONS, experts=True),
    # main diff with Qwen 3: the mixture of experts of Mixtral
    "qwen3_moe": DecoderAdapter("qwen3_moe", lora_target_modules=ATTENTION_PROJECTIONS, experts=True),
    # main diff with Llama: norms after attention and MLP instead of before, q/k norms over all heads
    "olmo2": DecoderAdapter("olmo2"),
    # main diff with OLMo 2: interleaved sliding/full layers, one rotary embedding per layer type
    "olmo3": PerLayerTypeRopeAdapter("olmo3"),
    # main diff with Llama: embedding, residual and attention multipliers, logits divided by a scale
    "granite": DecoderAdapter("granite"),
    # main diff with Llama: NoPE layers (no rotary embedding)
    "smollm3": NoRopeLayersAdapter("smollm3"),
    # main diff with Qwen 3 (q/k norms): norms after attention and MLP, NoPE full layers beside sliding ones
    "exaone4": GlobalNoRopeAdapter("exaone4"),
    # main diff with Llama: rotary on interleaved channel pairs
    "helium": DecoderAdapter("helium", interleaved_rotary=True),
    # main diff with Llama: interleaved partial rotary, norms after attention and MLP, fused gate_up_proj
    "glm4": DecoderAdapter("glm4", interleaved_rotary=True,
                           lora_target_modules=ATTENTION_PROJECTIONS + ("gate_up_proj", "down_proj")),
    # main diff with Llama: interleaved rotary, LayerNorm, attention and MLP in parallel, scaled logits
    "cohere": DecoderAdapter("cohere", interleaved_rotary=True),
    # main diff with Mixtral: attention sinks (a learned logit per head; eager attention), biases, interleaved
    # sliding/full layers; its experts are stored fused, as the model holds them
    "gpt_oss": DecoderAdapter("gpt_oss", lora_target_modules=ATTENTION_PROJECTIONS),
    # main diff with Cohere: interleaved sliding/full layers, the full ones NoPE
    "cohere2": SlidingRopeOnlyAdapter("cohere2", interleaved_rotary=True),
    # main diff with Qwen 2: a mixture of experts beside a shared expert, experts stored apart
    "qwen2_moe": DecoderAdapter("qwen2_moe", lora_target_modules=ATTENTION_PROJECTIONS, experts=True),
    # main diff with OLMo 2: a mixture of experts (experts stored apart), pre-norms
    "olmoe": DecoderAdapter("olmoe", lora_target_modules=ATTENTION_PROJECTIONS, experts=True),
    # main diff with Llama: rotary on interleaved channel pairs
    "ernie4_5": DecoderAdapter("ernie4_5", interleaved_rotary=True),
    # main diff with Llama: q/k/v biases
    "seed_oss": DecoderAdapter("seed_oss"),
    # main diff with Llama: a plain (not gated) ReLU² MLP
    "arcee": DecoderAdapter("arcee", lora_target_modules=ATTENTION_PROJECTIONS + ("up_proj", "down_proj")),
    # main diff with Llama: q/k norms, a plain (not gated) xIELU MLP
    "apertus": DecoderAdapter("apertus", lora_target_modules=ATTENTION_PROJECTIONS + ("up_proj", "down_proj")),
    # main diff with Llama: q/k norms
    "hunyuan_v1_dense": DecoderAdapter("hunyuan_v1_dense"),
    # main diff with Llama: LayerNorm with biases, biased projections, a plain (not gated) MLP
    "starcoder2": DecoderAdapter("starcoder2", lora_target_modules=ATTENTION_PROJECTIONS + ("c_fc", "c_proj")),
}


def supported_model_types() -> list[str]:
    return sorted(ADAPTERS)


def get_adapter(model_type: str) -> DecoderAdapter:
    """The adapter for `model_type`; a clear error naming the supported families otherwise."""
    try:
        return ADAPTERS[model_type]
    except KeyError:
        raise ValueError(
            f"hf_fam does not support model_type {model_type!r}; supported: {', '.join(supported_model_types())}."
        ) from None
