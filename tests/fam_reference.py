"""A deliberately naive reference implementation of TransformerFAM, for testing hf_fam against.

This module re-computes the FAM forward pass of docs/design.md §1 on an *unmodified* Hugging Face
`LlamaForCausalLM`, `MistralForCausalLM` or `GemmaForCausalLM`, using only the model's own sub-modules
(embedding, norms, q/k/v/o projections, MLP, rotary embedding, lm_head). It is written to be obviously
correct, not fast:

* one row of the batch at a time, with its padding dropped;
* an outer Python loop over layers and an inner Python loop over blocks;
* an explicit key list and an explicit boolean "may attend" matrix for every attention call;
* every token rotated at its absolute position (real tokens 0..n-1, FAM tokens at the positions below).

It shares no code with hf_fam on purpose: the two implementations must agree because both follow the
specification, not because one calls the other.

Public functions:

* `reference_fam_logits` - the FAM computation (F = 0 gives Block Sliding Window Attention).
* `reference_bswa_mask_logits` - the F = 0 case computed a second way: one call of the unmodified model
  with eager attention and a hand-built 4D block mask.

Run this file directly (`python tests/fam_reference.py`) for a self-check against the unmodified models.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Callable, Iterator

import torch
from torch import nn

__all__ = ["reference_fam_logits", "reference_bswa_mask_logits"]


# ----------------------------------------------------------------------------------------------------------
# Small helpers: what differs between the families, and one attention sub-layer written out by hand.
# ----------------------------------------------------------------------------------------------------------


def _apply_rotary_pos_emb_of(model: nn.Module) -> Callable:
    """The family's own `apply_rotary_pos_emb`, taken from the modeling module of its attention class."""
    attention_class = type(model.model.layers[0].self_attn)
    return sys.modules[attention_class.__module__].apply_rotary_pos_emb


def _embed_scale_of(model: nn.Module) -> torch.Tensor:
    """The factor the embedding module multiplies token embeddings by (Gemma: sqrt(D); others: 1).

    Gemma applies it inside `GemmaTextScaledWordEmbedding.forward` as `* embed_scale.to(weight.dtype)`;
    the FAM init tensor lives at the token-embedding level, so it is scaled the same way.
    """
    embed_tokens = model.model.embed_tokens
    scale = getattr(embed_tokens, "embed_scale", None)
    if scale is None:
        return torch.ones((), dtype=embed_tokens.weight.dtype, device=embed_tokens.weight.device)
    return scale.to(embed_tokens.weight.dtype)


def _rope(model: nn.Module, like: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(cos, sin) of the model's rotary embedding at the given absolute positions.

    `positions` is a 1D long tensor of length L (it may contain negative positions, for the initial FAM);
    the results have shape (1, L, head_dim), as `apply_rotary_pos_emb` expects with `unsqueeze_dim=1`.
    """
    position_ids = positions.to(like.device).unsqueeze(0)  # (L,) -> (1, L)
    return model.model.rotary_emb(like, position_ids)


def _attention(
    model: nn.Module,
    layer: nn.Module,
    query_hidden: torch.Tensor,
    query_positions: torch.Tensor,
    key_hidden: torch.Tensor,
    key_positions: torch.Tensor,
    allowed: torch.Tensor,
) -> torch.Tensor:
    """One attention call of `layer`, written out: returns o_proj(softmax(q k^T * scaling + mask) v).

    Args:
        query_hidden: (Lq, D) the layer-input hidden states of the queries (before input_layernorm).
        query_positions: (Lq,) absolute RoPE positions of the queries.
        key_hidden: (Lk, D) the layer-input hidden states of the keys/values (before input_layernorm).
        key_positions: (Lk,) absolute RoPE positions of the keys.
        allowed: (Lq, Lk) bool, True where query i may attend to key j. Every row must allow some key.

    Returns:
        (Lq, D): the attention sub-layer's output, without the residual.
    """
    attn = layer.self_attn
    apply_rotary_pos_emb = _apply_rotary_pos_emb_of(model)
    head_dim = attn.head_dim
    num_heads = attn.q_proj.out_features // head_dim
    num_kv_heads = attn.k_proj.out_features // head_dim
    lq, lk = query_hidden.shape[0], key_hidden.shape[0]
    assert allowed.shape == (lq, lk) and allowed.dtype == torch.bool
    assert bool(allowed.any(dim=-1).all()), "every query must be allowed to see at least one key"

    # Pre-norm: queries and keys are both projected from the layer's input_layernorm of their hidden states.
    q_in = layer.input_layernorm(query_hidden)
    kv_in = layer.input_layernorm(key_hidden)
    q = attn.q_proj(q_in).view(1, lq, num_heads, head_dim).transpose(1, 2)  # (Lq, H*hd) -> (1, H, Lq, hd)
    k = attn.k_proj(kv_in).view(1, lk, num_kv_heads, head_dim).transpose(1, 2)  # -> (1, KVH, Lk, hd)
    v = attn.v_proj(kv_in).view(1, lk, num_kv_heads, head_dim).transpose(1, 2)  # -> (1, KVH, Lk, hd)

    # RoPE: queries and keys sit at different positions here, so rotate each with its own (cos, sin);
    # apply_rotary_pos_emb rotates its two arguments with the same angles, so the unused half is discarded.
    cos_q, sin_q = _rope(model, query_hidden, query_positions)
    cos_k, sin_k = _rope(model, key_hidden, key_positions)
    q, _ = apply_rotary_pos_emb(q, q, cos_q, sin_q)
    _, k = apply_rotary_pos_emb(k, k, cos_k, sin_k)

    # GQA: query head h uses key/value head h // n_rep (the same grouping as transformers' repeat_kv).
    n_rep = num_heads // num_kv_heads
    k = k.repeat_interleave(n_rep, dim=1)  # (1, KVH, Lk, hd) -> (1, H, Lk, hd)
    v = v.repeat_interleave(n_rep, dim=1)  # (1, KVH, Lk, hd) -> (1, H, Lk, hd)

    # Plain attention in fp32; masked keys get -inf (no row is fully masked, so softmax has no NaN).
    scores = torch.matmul(q.float(), k.float().transpose(-1, -2)) * attn.scaling  # (1, H, Lq, Lk)
    additive = torch.zeros((lq, lk), dtype=torch.float32, device=scores.device)
    additive = additive.masked_fill(~allowed.to(scores.device), float("-inf"))
    probs = torch.softmax(scores + additive, dim=-1)  # (1, H, Lq, Lk)
    out = torch.matmul(probs, v.float()).to(query_hidden.dtype)  # (1, H, Lq, hd)
    out = out.transpose(1, 2).reshape(lq, num_heads * head_dim)  # (1, H, Lq, hd) -> (Lq, H*hd)
    return attn.o_proj(out)


def _decoder_layer(
    model: nn.Module,
    layer: nn.Module,
    query_hidden: torch.Tensor,
    query_positions: torch.Tensor,
    key_hidden: torch.Tensor,
    key_positions: torch.Tensor,
    allowed: torch.Tensor,
) -> torch.Tensor:
    """A full pre-norm decoder layer for the given queries and key set (see `_attention` for the args).

    attention + residual, then MLP(post_attention_layernorm(.)) + residual, exactly as Llama/Mistral/Gemma
    decoder layers run it. Returns the queries' layer output, (Lq, D).
    """
    h = query_hidden + _attention(model, layer, query_hidden, query_positions, key_hidden, key_positions, allowed)
    return h + layer.mlp(layer.post_attention_layernorm(h))


def _positions(start: int, stop: int, device: torch.device) -> torch.Tensor:
    """Absolute positions start..stop-1 as a 1D long tensor (start may be negative)."""
    return torch.arange(start, stop, dtype=torch.long, device=device)


# ----------------------------------------------------------------------------------------------------------
# 1. FAM, the naive way.
# ----------------------------------------------------------------------------------------------------------


def _fam_row_hidden(
    model: nn.Module,
    ids: torch.Tensor,
    block_size: int,
    memory_segments: int,
    fam_length: int,
    fam_init: torch.Tensor | None,
    fam_update: str = "paper",
) -> torch.Tensor:
    """The last layer's output (before the final norm) for ONE row of real tokens `ids` (n,), as (n, D)."""
    device = ids.device
    n = ids.shape[0]
    C, M, F = block_size, memory_segments, fam_length
    layers = list(model.model.layers)

    # Blocks are counted from the row's first real token; the last one may be partial.
    blocks = [(start, min(start + C, n)) for start in range(0, n, C)]  # [(start_tau, end_tau)], end exclusive

    # Layer-0 input of the tokens (the embedding module applies Gemma's scale itself).
    hidden = model.model.embed_tokens(ids)  # (n, D)

    # Initial FAM of every layer: F_0^0 = fam_init * embed_scale, F_0^{l+1} = Layer_l(F_0^l), where the FAM
    # attends to all of itself (no causality) at positions -F..-1.
    fam_initial_per_layer: list[torch.Tensor | None] = [None] * len(layers)
    if F > 0:
        fam = fam_init.to(device=device, dtype=hidden.dtype) * _embed_scale_of(model)  # (F, D)
        fam_pos = _positions(-F, 0, device)
        everything = torch.ones((F, F), dtype=torch.bool, device=device)
        for l, layer in enumerate(layers):
            fam_initial_per_layer[l] = fam
            fam = _decoder_layer(model, layer, fam, fam_pos, fam, fam_pos, everything)

    # Outer loop over layers: all blocks of layer l are finished before layer l+1 starts, because the memory
    # blocks of layer l+1 need layer l's outputs of earlier blocks anyway.
    for l, layer in enumerate(layers):
        fam = fam_initial_per_layer[l]  # this layer's own FAM state, F_{tau-1}^l inside the loop below
        outputs = torch.zeros_like(hidden)
        for tau, (start, end) in enumerate(blocks):
            # --- Block tokens: keys = [M previous blocks, previous FAM, this block (causally)] ---
            first_memory_block = max(0, tau - M)
            memory_start = blocks[first_memory_block][0] if tau > 0 else start  # == start when M == 0
            block_len = end - start

            key_parts = [hidden[memory_start:start]]
            key_pos_parts = [_positions(memory_start, start, device)]
            if F > 0:
                # The FAM used by block tau compressed block tau-1 and sits just before this block.
                key_parts.append(fam)
                key_pos_parts.append(_positions(start - F, start, device))
            key_parts.append(hidden[start:end])
            key_pos_parts.append(_positions(start, end, device))
            keys = torch.cat(key_parts, dim=0)  # (n_memory + F + block_len, D)
            key_pos = torch.cat(key_pos_parts, dim=0)

            n_memory = start - memory_start
            allowed = torch.zeros((block_len, keys.shape[0]), dtype=torch.bool, device=device)
            allowed[:, : n_memory + F] = True  # memory blocks and FAM: fully visible
            if fam_update == "sink":  # only the first FAM slot, once block 0 has left the window (tau > M)
                allowed[:, n_memory + min(F, 1) * (tau > M) : n_memory + F] = False
            for t in range(block_len):  # this block: token t sees block tokens 0..t
                allowed[t, n_memory + F : n_memory + F + t + 1] = True

            outputs[start:end] = _decoder_layer(
                model, layer, hidden[start:end], _positions(start, end, device), keys, key_pos, allowed
            )

            # --- FAM update, only when the block is complete ---
            if F > 0 and block_len == C and fam_update == "paper":
                # FAM queries at the previous FAM's positions see all of the previous FAM and all of this
                # block; no memory blocks, no causality.
                fam_pos = _positions(start - F, start, device)
                update_keys = torch.cat([fam, hidden[start:end]], dim=0)  # (F + C, D)
                update_key_pos = torch.cat([fam_pos, _positions(start, end, device)], dim=0)
                everything = torch.ones((F, F + C), dtype=torch.bool, device=device)
                fam = _decoder_layer(model, layer, fam, fam_pos, update_keys, update_key_pos, everything)
        hidden = outputs
    return hidden


def reference_fam_logits(
    model: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None,
    block_size: int,
    memory_segments: int,
    fam_length: int,
    fam_init: torch.Tensor | None,
    fam_update: str = "paper",
) -> torch.Tensor:
    """Logits of the FAM computation (docs/design.md §1) on an unmodified Llama/Mistral/Gemma model.

    Every row is processed on its own with its padding dropped: real tokens get positions 0..n_b-1 and
    blocks of `block_size` tokens are counted from the row's first real token. For every layer l (outer
    loop) and block tau (inner loop), block tokens attend to the `memory_segments` previous blocks, the
    `fam_length` tokens of the layer's previous FAM state (positions start_tau-F..start_tau-1) and their own
    block causally; after each complete block the FAM state is updated by attending to itself and the whole
    block. The initial FAM is `fam_init` (times Gemma's embedding scale) propagated once through the layers.
    `fam_length == 0` is Block Sliding Window Attention; `memory_segments == 0` keeps no past blocks.

    The reference applies no dropout; call it on a model in eval mode.

    Args:
        model: an unmodified `LlamaForCausalLM`, `MistralForCausalLM` or `GemmaForCausalLM`.
        input_ids: (B, N) long.
        attention_mask: (B, N) of 0/1 (padding left or right), or None for no padding.
        block_size: C >= 1.
        memory_segments: M >= 0.
        fam_length: F >= 0.
        fam_init: (F, D) initial FAM embeddings; ignored when F == 0.
        fam_update: "paper" (above) or "sink": no FAM update; block tau reads only the first slot of the
            initial FAM, and only when tau > M (the first block has left its window).

    Returns:
        (B, N, vocab) logits; each row's real-token logits at their original columns, zeros at padding.
    """
    if block_size < 1 or memory_segments < 0 or fam_length < 0:
        raise ValueError("need block_size >= 1, memory_segments >= 0, fam_length >= 0")
    hidden_size = model.model.embed_tokens.weight.shape[1]
    if fam_length > 0 and (fam_init is None or tuple(fam_init.shape) != (fam_length, hidden_size)):
        raise ValueError(f"fam_init must have shape ({fam_length}, {hidden_size})")
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)

    batch, seq_len = input_ids.shape
    vocab = model.lm_head.out_features
    logits = torch.zeros((batch, seq_len, vocab), dtype=model.lm_head.weight.dtype, device=input_ids.device)
    for b in range(batch):
        real_columns = torch.nonzero(attention_mask[b].bool(), as_tuple=False).flatten()  # (n_b,)
        if real_columns.numel() == 0:
            continue  # an all-padding row has no logits to give
        ids = input_ids[b, real_columns]  # (n_b,)
        hidden = _fam_row_hidden(model, ids, block_size, memory_segments, fam_length, fam_init, fam_update)
        logits[b, real_columns] = model.lm_head(model.model.norm(hidden))
    return logits


# ----------------------------------------------------------------------------------------------------------
# 2. F = 0 a second way: the unmodified model with eager attention and a 4D block mask.
# ----------------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def _eager_attention(model: nn.Module) -> Iterator[None]:
    """Temporarily make every config object in the model say `_attn_implementation == "eager"`.

    The attention modules look up `self.config._attn_implementation` at call time, and eager attention adds
    a 4D float mask to the scores unchanged; sdpa would also accept it, but eager is the plainest path.
    """
    configs = {id(m.config): m.config for m in model.modules() if hasattr(m, "config")}
    configs[id(model.config)] = model.config
    saved = {key: config._attn_implementation for key, config in configs.items()}
    try:
        for config in configs.values():
            config._attn_implementation = "eager"
        for layer in model.model.layers:
            assert layer.self_attn.config._attn_implementation == "eager"
        yield
    finally:
        for key, config in configs.items():
            config._attn_implementation = saved[key]


def _row_positions(attention_mask: torch.Tensor) -> torch.Tensor:
    """(B, N) positions: real tokens 0..n_b-1 from the row's first real token, padding 0."""
    positions = torch.zeros(attention_mask.shape, dtype=torch.long, device=attention_mask.device)
    for b in range(attention_mask.shape[0]):
        next_position = 0
        for i in range(attention_mask.shape[1]):
            if attention_mask[b, i]:
                positions[b, i] = next_position
                next_position += 1
    return positions


def _bswa_allowed(attention_mask: torch.Tensor, block_size: int, memory_segments: int) -> torch.Tensor:
    """(B, N, N) bool: query i may see key j iff both are real, j <= i and block(j) >= block(i) - M.

    A padding query may see itself only, so that its softmax row is not empty.
    """
    batch, seq_len = attention_mask.shape
    positions = _row_positions(attention_mask)
    allowed = torch.zeros((batch, seq_len, seq_len), dtype=torch.bool, device=attention_mask.device)
    for b in range(batch):
        for i in range(seq_len):
            if not attention_mask[b, i]:
                allowed[b, i, i] = True
                continue
            block_i = int(positions[b, i]) // block_size
            for j in range(i + 1):
                if attention_mask[b, j] and int(positions[b, j]) // block_size >= block_i - memory_segments:
                    allowed[b, i, j] = True
    return allowed


def _eager_logits_with_mask(
    model: nn.Module, input_ids: torch.Tensor, allowed: torch.Tensor, position_ids: torch.Tensor
) -> torch.Tensor:
    """One call of the unmodified model with eager attention and the (B, N, N) bool mask `allowed`."""
    dtype = model.lm_head.weight.dtype
    float_mask = torch.zeros(allowed.shape, dtype=dtype, device=input_ids.device)
    float_mask = float_mask.masked_fill(~allowed, torch.finfo(dtype).min)
    float_mask = float_mask.unsqueeze(1)  # (B, N, N) -> (B, 1, N, N), broadcast over heads
    with _eager_attention(model):
        return model(input_ids=input_ids, attention_mask=float_mask, position_ids=position_ids).logits


def reference_bswa_mask_logits(
    model: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None,
    block_size: int,
    memory_segments: int,
) -> torch.Tensor:
    """Block Sliding Window Attention logits from one forward of the unmodified model with a 4D mask.

    Query i may see key j iff both are real tokens of the row, j <= i and block(j) >= block(i) - M (blocks
    of `block_size` counted from the row's first real token); real tokens get positions 0..n_b-1. The model
    runs with eager attention, which adds the (B, 1, N, N) float mask to the scores unchanged.

    Args:
        model: an unmodified `LlamaForCausalLM`, `MistralForCausalLM` or `GemmaForCausalLM`.
        input_ids: (B, N) long.
        attention_mask: (B, N) of 0/1 (padding left or right), or None for no padding.
        block_size: C >= 1.
        memory_segments: M >= 0.

    Returns:
        (B, N, vocab) logits; padding positions are zeroed, to match `reference_fam_logits`.
    """
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    allowed = _bswa_allowed(attention_mask, block_size, memory_segments)
    logits = _eager_logits_with_mask(model, input_ids, allowed, _row_positions(attention_mask))
    return logits * attention_mask.unsqueeze(-1).to(logits.dtype)


# ----------------------------------------------------------------------------------------------------------
# 3. Self-check: `python tests/fam_reference.py`.
# ----------------------------------------------------------------------------------------------------------


def _tiny_models() -> dict[str, nn.Module]:
    """Tiny fp32 Llama, Mistral and Gemma models (2 layers, 4 heads, 2 KV heads), in eval mode.

    Random init gives near-uniform attention; larger q/k weights (sharpen 8) make positions and masks matter more.
    """
    from hf_fam.tiny import tiny_model

    sizes = dict(hidden_size=32, intermediate_size=64, vocab_size=100, sharpen=8.0)
    return {
        "llama": tiny_model("llama", 0, **sizes).eval(),
        "mistral": tiny_model("mistral", 1, **sizes).eval(),
        "gemma": tiny_model("gemma", 2, **{**sizes, "hidden_size": 64}).eval(),
    }


def _real_diff(a: torch.Tensor, b: torch.Tensor, mask: torch.Tensor) -> float:
    """Max abs difference over real-token positions only."""
    real = mask.bool()
    return (a[real] - b[real]).abs().max().item()


def _self_check() -> None:
    torch.manual_seed(1234)
    N = 23
    results: dict[str, float] = {}

    def record(name: str, value: float, tolerance: float | None = 1e-5, minimum: float | None = None) -> None:
        results[name] = value
        status = "ok"
        if tolerance is not None and not value <= tolerance:
            status = "FAIL"
        if minimum is not None and not value > minimum:
            status = "FAIL"
        print(f"{status:4s} {name}: {value:.3e}")
        if status == "FAIL":
            raise AssertionError(name)

    for family, model in _tiny_models().items():
        vocab = model.config.vocab_size
        D = model.config.hidden_size
        ids = torch.randint(0, vocab, (3, N))
        masks = {
            "nopad": torch.ones(3, N, dtype=torch.long),
            "rightpad": torch.tensor([[1] * N, [1] * (N - 5) + [0] * 5, [1] * (N - 11) + [0] * 11]),
            "leftpad": torch.tensor([[1] * N, [0] * 4 + [1] * (N - 4), [0] * 9 + [1] * (N - 9)]),
        }
        with torch.no_grad():
            # (a) F = 0, window covering the sequence -> the unmodified model (its own sdpa path).
            for pad_name, mask in masks.items():
                plain = model(input_ids=ids, attention_mask=mask, position_ids=_row_positions(mask)).logits
                for C, M in [(N, 0), (8, 2), (5, 4), (1, N), (30, 0)]:
                    ref = reference_fam_logits(model, ids, mask, C, M, 0, None)
                    record(f"{family} {pad_name} F=0 C={C} M={M} vs model", _real_diff(ref, plain, mask))
                    assert bool((ref[~mask.bool()] == 0).all())

            # (b) F = 0, small windows -> the eager 4D-mask computation.
            for pad_name, mask in masks.items():
                for C, M in [(4, 1), (3, 0), (1, 2), (6, 2), (5, 1)]:
                    ref = reference_fam_logits(model, ids, mask, C, M, 0, None)
                    bswa = reference_bswa_mask_logits(model, ids, mask, C, M)
                    record(f"{family} {pad_name} F=0 C={C} M={M} vs 4D mask", _real_diff(ref, bswa, mask))

            # (c) The 4D mask is really used: the eager 4D path with a full causal block window equals the
            # model, while a small window, and a deliberately wrong mask, both change the logits.
            mask = masks["leftpad"]
            plain = model(input_ids=ids, attention_mask=mask, position_ids=_row_positions(mask)).logits
            full_window = reference_bswa_mask_logits(model, ids, mask, N, 0)
            record(f"{family} 4D mask full window vs model", _real_diff(full_window, plain, mask))
            small_window = reference_bswa_mask_logits(model, ids, mask, 4, 1)
            record(f"{family} 4D mask small window differs from model", _real_diff(small_window, plain, mask),
                   tolerance=None, minimum=1e-3)
            wrong = torch.eye(N, dtype=torch.bool).expand(3, N, N)  # every token sees only itself
            wrong_logits = _eager_logits_with_mask(model, ids, wrong, _row_positions(mask))
            record(f"{family} 4D wrong mask differs", _real_diff(wrong_logits, plain, mask), tolerance=None,
                   minimum=1e-3)

            # (d) The hand-written FAM init step equals the model's own decoder layer with a full mask.
            F = 3
            fam_init = torch.randn(F, D)
            fam_pos = _positions(-F, 0, ids.device)
            # The scale helper must match what the embedding module itself does to token embeddings.
            embedded = model.model.embed_tokens(ids)  # (B, N, D)
            record(f"{family} embed scale helper",
                   (embedded - model.model.embed_tokens.weight[ids] * _embed_scale_of(model)).abs().max().item(),
                   tolerance=0.0)
            fam = fam_init * _embed_scale_of(model)
            worst = 0.0
            for layer in model.model.layers:
                mine = _decoder_layer(model, layer, fam, fam_pos, fam, fam_pos, torch.ones(F, F, dtype=torch.bool))
                with _eager_attention(model):
                    theirs = layer(
                        fam.unsqueeze(0),  # (F, D) -> (1, F, D)
                        attention_mask=torch.zeros(1, 1, F, F),
                        position_ids=fam_pos.unsqueeze(0),
                        position_embeddings=_rope(model, fam, fam_pos),
                    )
                theirs = theirs[0] if isinstance(theirs, tuple) else theirs
                worst = max(worst, (mine - theirs[0]).abs().max().item())
                fam = mine
            record(f"{family} FAM init step vs decoder layer", worst)

            # (e) F > 0 carries information beyond the window; F = 0 does not.
            C, M = 4, 1  # window: the current and one previous block
            changed = ids.clone()
            changed[:, :2] = (changed[:, :2] + 1) % vocab  # alter tokens in the first block of every row
            mask = masks["nopad"]
            base_fam = reference_fam_logits(model, ids, mask, C, M, F, fam_init)
            alt_fam = reference_fam_logits(model, changed, mask, C, M, F, fam_init)
            base_bswa = reference_fam_logits(model, ids, mask, C, M, 0, None)
            alt_bswa = reference_fam_logits(model, changed, mask, C, M, 0, None)
            # Each layer reaches M blocks further back, so with L layers block 0 is out of reach of every
            # block from L*M + 1 on.
            beyond = slice(C * (len(model.model.layers) * M + 1), N)
            record(f"{family} F=0 beyond window unchanged",
                   (base_bswa[:, beyond] - alt_bswa[:, beyond]).abs().max().item(), tolerance=0.0)
            record(f"{family} F={F} beyond window changed",
                   (base_fam[:, beyond] - alt_fam[:, beyond]).abs().max().item(), tolerance=None, minimum=1e-4)
            # With M = 0 too: only the FAM links blocks.
            base0 = reference_fam_logits(model, ids, mask, C, 0, F, fam_init)
            alt0 = reference_fam_logits(model, changed, mask, C, 0, F, fam_init)
            record(f"{family} F={F} M=0 later blocks changed",
                   (base0[:, C:] - alt0[:, C:]).abs().max().item(), tolerance=None, minimum=1e-4)

            # (f) Causality: changing token k never changes logits before k (with padding, F > 0).
            for pad_name, mask in masks.items():
                base = reference_fam_logits(model, ids, mask, 4, 1, F, fam_init)
                worst = 0.0
                for k in [5, 8, 12, N - 1]:
                    later = ids.clone()
                    later[:, k] = (later[:, k] + 7) % vocab
                    other = reference_fam_logits(model, later, mask, 4, 1, F, fam_init)
                    worst = max(worst, (base[:, :k] - other[:, :k]).abs().max().item())
                record(f"{family} {pad_name} F={F} causality", worst, tolerance=0.0)

            # (g) Padding side does not matter: each row's real tokens give the same logits.
            row_ids = ids[2, : N - 9]
            alone = reference_fam_logits(model, row_ids.unsqueeze(0), None, 4, 1, F, fam_init)[0]
            left_ids = torch.cat([torch.zeros(9, dtype=torch.long), row_ids]).unsqueeze(0)
            right_ids = torch.cat([row_ids, torch.zeros(9, dtype=torch.long)]).unsqueeze(0)
            left = reference_fam_logits(model, left_ids, masks["leftpad"][2:3], 4, 1, F, fam_init)[0, 9:]
            right_mask = torch.tensor([[1] * (N - 9) + [0] * 9])
            right = reference_fam_logits(model, right_ids, right_mask, 4, 1, F, fam_init)[0, : N - 9]
            record(f"{family} F={F} left/right padding vs alone",
                   max((alone - left).abs().max().item(), (alone - right).abs().max().item()))

            # (h) One block only (C >= n): the FAM is then just a prefix of F extra embeddings at positions
            # -F..-1 that see each other fully, and tokens see the prefix plus themselves causally. That is
            # one call of the unmodified model on [fam_init * scale ; token embeddings] with a 4D mask.
            n = 10
            prefix_ids = ids[:1, :n]
            token_embeds = model.model.embed_tokens(prefix_ids)  # (1, n, D), Gemma's scale included
            fam_embeds = (fam_init * _embed_scale_of(model)).unsqueeze(0)  # (F, D) -> (1, F, D)
            embeds = torch.cat([fam_embeds, token_embeds], dim=1)  # (1, F + n, D)
            allowed = torch.zeros(1, F + n, F + n, dtype=torch.bool)
            allowed[0, :F, :F] = True  # FAM sees all of itself, no tokens
            allowed[0, F:, :F] = True  # tokens see the whole FAM
            allowed[0, F:, F:] = torch.tril(torch.ones(n, n, dtype=torch.bool))  # and their block causally
            float_mask = torch.zeros(1, 1, F + n, F + n)  # (B, 1, Lq, Lk)
            float_mask = float_mask.masked_fill(~allowed.unsqueeze(1), torch.finfo(torch.float32).min)
            with _eager_attention(model):
                prefixed = model(
                    inputs_embeds=embeds,
                    attention_mask=float_mask,
                    position_ids=_positions(-F, n, ids.device).unsqueeze(0),
                ).logits[:, F:]
            for C in [n, n + 3]:  # a complete block (update fires, unobservable) and a partial one
                ref = reference_fam_logits(model, prefix_ids, None, C, 2, F, fam_init)
                record(f"{family} F={F} single block C={C} vs prefixed model", (ref - prefixed).abs().max().item())

    print(f"all {len(results)} checks passed")


if __name__ == "__main__":
    _self_check()
