"""A second, family-agnostic FAM reference: the model's own decoder layers, called block by block with
explicit 4D masks and absolute positions.

`tests/fam_reference.py` rewrites a Llama-shaped layer by hand; families with other layer wiring (Gemma 2/3's
extra norms, Phi-3's fused projections, Qwen 3's q/k norms) are checked here instead. For every layer l,
row and block τ, the layer runs once on the sequence

    [ memory blocks τ-M..τ-1 | FAM_{τ-1} (F tokens) | block τ ]

with eager attention and a mask in which block tokens see the memory, the FAM and their block causally,
FAM tokens see the FAM and the whole block (docs/design.md §1), and memory tokens see only themselves (their
outputs are thrown away). The FAM outputs are the new FAM of layer l, the block outputs the block's input
to layer l+1. Deliberately slow and plain.
"""

from __future__ import annotations

import inspect

import torch


def _layer_type(model, layer_idx: int) -> str | None:
    types = getattr(model.config, "layer_types", None)
    return types[layer_idx] if types else None


def _position_embeddings(model, x: torch.Tensor, positions: torch.Tensor, layer_idx: int):
    rotary = model.model.rotary_emb
    if "layer_type" in inspect.signature(rotary.forward).parameters:  # one rotary per layer type (Gemma 3, OLMo 3)
        return rotary(x, positions[None], _layer_type(model, layer_idx))
    return rotary(x, positions[None])


def _run_layer(model, layer_idx: int, x: torch.Tensor, positions: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
    """One decoder layer on x (L, D) at absolute `positions` (L,), query i seeing key j iff allowed[i, j]."""
    layer = model.model.layers[layer_idx]
    mask = torch.zeros(allowed.shape, dtype=x.dtype).masked_fill(~allowed, torch.finfo(x.dtype).min)
    out = layer(
        x[None],
        attention_mask=mask[None, None],
        position_ids=positions[None],
        position_embeddings=_position_embeddings(model, x[None], positions, layer_idx),
    )
    out = out[0] if isinstance(out, tuple) else out
    return out[0]


def layer_fam_lengths(model, fam_length: int, fam_layers: str) -> list[int]:
    n = model.config.num_hidden_layers
    if fam_layers == "all":
        return [fam_length] * n
    return [fam_length if _layer_type(model, i) in (None, "full_attention") else 0 for i in range(n)]


def reference_layer_fam_logits(model, input_ids, attention_mask, block_size: int, memory_segments: int,
                               fam_length: int, fam_init, fam_layers: str = "all") -> torch.Tensor:
    """Logits (B, N, V) of FAM as docs/design.md §1, rows processed one by one (padding positions get zeros)."""
    C, M, F = block_size, memory_segments, fam_length
    impl = model.config._attn_implementation
    model.config._attn_implementation = "eager"
    try:
        with torch.no_grad():
            return _logits(model, input_ids, attention_mask, C, M, F, fam_init, fam_layers)
    finally:
        model.config._attn_implementation = impl


def _logits(model, input_ids, attention_mask, C, M, F, fam_init, fam_layers):
    B, N = input_ids.shape
    mask = torch.ones(B, N, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
    f_per_layer = layer_fam_lengths(model, F, fam_layers)
    embed = model.model.embed_tokens
    multiplier = getattr(model.config, "embedding_multiplier", 1.0)  # Granite scales embeddings in its forward
    scale = getattr(embed, "embed_scale", None)  # Gemma scales them in its embedding module
    scale = multiplier if scale is None else scale.to(embed.weight.dtype)
    logits = torch.zeros(B, N, model.config.vocab_size)
    for b in range(B):
        cols = mask[b].nonzero().flatten()
        n = len(cols)
        if n == 0:
            continue
        h = embed(input_ids[b, cols][None])[0] * multiplier  # (n, D)
        fam = fam_init * scale if F > 0 else None  # F_0^0
        for l in range(model.config.num_hidden_layers):
            F_l = f_per_layer[l]
            fam_next_layer = None
            if F > 0:
                # initial FAM, forward propagated: F_0^{l+1} = Layer_l(F_0^l), attending only to itself
                fam_next_layer = _run_layer(model, l, fam, torch.arange(-F, 0), torch.ones(F, F, dtype=torch.bool))
            state = fam if F_l > 0 else None
            out = torch.empty_like(h)
            for s in range(0, n, C):
                e = min(s + C, n)
                m0 = max(0, s - M * C)
                mem, blk = h[m0:s], h[s:e]
                Lm, Lb = s - m0, e - s
                Lf = F_l
                parts = [mem] + ([state] if Lf else []) + [blk]
                x = torch.cat(parts)
                pos = torch.cat([torch.arange(m0, s), torch.arange(s - Lf, s), torch.arange(s, e)])
                L = Lm + Lf + Lb
                allowed = torch.zeros(L, L, dtype=torch.bool)
                allowed[:Lm, :Lm] = torch.eye(Lm, dtype=torch.bool)  # memory rows: not used
                fq = slice(Lm, Lm + Lf)
                bq = slice(Lm + Lf, L)
                allowed[fq, Lm:] = True  # FAM: previous FAM and the whole block
                allowed[bq, : Lm + Lf] = True  # block: memory and FAM
                allowed[bq, bq] = torch.tril(torch.ones(Lb, Lb, dtype=torch.bool))  # own block, causally
                y = _run_layer(model, l, x, pos, allowed)
                out[s:e] = y[bq]
                if Lf and Lb == C:  # FAM update after a complete block only
                    state = y[fq]
            h = out
            fam = fam_next_layer
        hidden = model.model.norm(h)
        row = model.lm_head(hidden) / getattr(model.config, "logits_scaling", 1.0)  # Granite divides its logits,
        row = row * getattr(model.config, "logit_scale", 1.0)  # Cohere multiplies them
        cap = getattr(model.config, "final_logit_softcapping", None)
        if cap:
            row = torch.tanh(row / cap) * cap
        logits[b, cols] = row.float()
    return logits
