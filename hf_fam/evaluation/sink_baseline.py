"""Block sliding window attention with attention sinks: the StreamingLLM baseline (Xiao et al., arXiv 2309.17453).

An evaluation baseline, not part of a FAM checkpoint: the base model, unchanged, run with block sliding window
attention (blocks of C tokens, each seeing its M previous blocks and itself causally) whose queries also see the
first `sinks` tokens of the sequence. A window that loses the first tokens loses the model's attention sink
(the BOS token most pretrained models dump their spare attention on); keeping a few of them restores most of the
quality. This is what a FAM memory must match zero-shot.

Positions follow StreamingLLM: a block is computed in its own frame (as FAM and BSWA are in `fam_core`), and
once the sinks have left the window they sit immediately before its oldest token, so no relative distance
ever exceeds C·(M+1) + sinks, however long the text. While the first block is still inside the window the
sinks are just part of it.

Example:
```python
>>> with sink_attention(model, block_size=128, memory_segments=1, sinks=4) as run:
...     logits = run(input_ids).logits
```
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator

import torch
from torch.nn import functional as F_

from ..modeling.fam_adapters import apply_rotation, get_adapter, relative_rotation

ATTENTION_NAME = "bswa_sinks"
_SCORE_BYTES_BUDGET = 128 * 2**20


class _SinkRun:
    def __init__(self, model, block_size: int, memory_segments: int, sinks: int):
        self.model = model
        self.C, self.M, self.K = block_size, memory_segments, sinks
        self.adapter = get_adapter(model.config.model_type)
        self.decoder = self.adapter.decoder(model)
        self._rot: dict[int, tuple] = {}

    def origin(self) -> int:
        return self.M * self.C + self.K

    def __call__(self, input_ids: torch.Tensor, **kwargs):
        """Forward of the whole sequence (B, N) at once; returns the model's output."""
        n = input_ids.shape[1]
        pos = self.origin() + torch.arange(n, device=input_ids.device) % self.C
        return self.model(input_ids, position_ids=pos[None].expand(input_ids.shape[0], -1), use_cache=False,
                          bswa_sinks_run=self, **kwargs)

    def rotations(self, layer_idx: int, device):
        inv_freq = self.adapter.inv_freq(self.decoder, layer_idx)
        if id(inv_freq) not in self._rot:
            deltas = [-s * self.C for s in range(1, self.M + 1)] + [-(self.M * self.C + self.K)]
            self._rot[id(inv_freq)] = relative_rotation(inv_freq, deltas, device,
                                                        interleaved=self.adapter.interleaved_rotary)
        return self._rot[id(inv_freq)]

    def attend(self, module, query, key, value, scaling) -> torch.Tensor:
        """query (B, H, N, hd), key/value (B, KVH, N, hd) at frame positions -> (B, N, H, hd)."""
        C, M, K = self.C, self.M, self.K
        B, H, N, hd = query.shape
        KVH = key.shape[1]
        T = math.ceil(N / C)
        pad = T * C - N
        q = F_.pad(query, (0, 0, 0, pad)).view(B, H, T, C, hd).transpose(1, 2)  # (B, T, H, C, hd)
        k = F_.pad(key, (0, 0, M * C, pad)).view(B, KVH, M + T, C, hd)
        v = F_.pad(value, (0, 0, M * C, pad)).view(B, KVH, M + T, C, value.shape[-1])
        cos, sin = self.rotations(module.layer_idx, query.device)
        interleaved = self.adapter.interleaved_rotary
        sink_k = apply_rotation(key[:, :, :K], cos[M], sin[M], interleaved)  # (B, KVH, K, hd): just before the window
        sink_v = value[:, :, :K]
        S = K + M * C + C
        device = query.device
        causal = torch.ones(C, C, dtype=torch.bool, device=device).tril()
        group = max(1, _SCORE_BYTES_BUDGET // (B * H * C * S * 4))
        outs = []
        for t0 in range(0, T, group):
            t1 = min(T, t0 + group)
            G = t1 - t0
            t = torch.arange(t0, t1, device=device)
            parts_k = [sink_k[:, None].expand(B, G, KVH, K, hd)]
            parts_v = [sink_v[:, None].expand(B, G, KVH, K, sink_v.shape[-1])]
            allowed = [(t > M)[:, None, None].expand(G, C, K)]
            for s in range(M, 0, -1):
                src = slice(M - s + t0, M - s + t1)
                parts_k.append(apply_rotation(k[:, :, src], cos[s - 1], sin[s - 1], interleaved).transpose(1, 2))
                parts_v.append(v[:, :, src].transpose(1, 2))
                allowed.append((t - s >= 0)[:, None, None].expand(G, C, C))
            parts_k.append(k[:, :, M + t0 : M + t1].transpose(1, 2))
            parts_v.append(v[:, :, M + t0 : M + t1].transpose(1, 2))
            allowed.append(causal[None].expand(G, C, C))
            kk = torch.cat(parts_k, dim=3).reshape(B * G, KVH, S, hd)
            vv = torch.cat(parts_v, dim=3).reshape(B * G, KVH, S, -1)
            mask = torch.cat(allowed, dim=2)[None].expand(B, G, C, S).reshape(B * G, 1, C, S)
            qq = q[:, t0:t1].reshape(B * G, H, C, hd)
            if KVH != H:
                kk = kk.repeat_interleave(H // KVH, dim=1)
                vv = vv.repeat_interleave(H // KVH, dim=1)
            out = F_.scaled_dot_product_attention(qq, kk, vv, attn_mask=mask, scale=scaling)  # (BG, H, C, hd)
            outs.append(out.view(B, G, H, C, -1).permute(0, 1, 3, 2, 4).reshape(B, G * C, H, -1))
        return torch.cat(outs, dim=1)[:, :N]


def _sink_attention_forward(module, query, key, value, attention_mask, **kwargs):
    run = kwargs.get("bswa_sinks_run")
    if run is None:
        raise RuntimeError("bswa_sinks attention needs the run: call the model through sink_attention(...)")
    return run.attend(module, query, key, value, kwargs.get("scaling")), None


@contextlib.contextmanager
def sink_attention(model, *, block_size: int, memory_segments: int, sinks: int = 4) -> Iterator[_SinkRun]:
    """Run `model` (a plain Llama/Mistral/... causal LM) as BSWA + `sinks` attention sinks inside the block.

    Yields a callable: `run(input_ids)` -> the model's output for the whole sequence (no cache).
    """
    from transformers import AttentionInterface

    if sinks < 1 or block_size < 1 or memory_segments < 0:
        raise ValueError("sinks and block_size must be >= 1, memory_segments >= 0")
    if sinks > block_size:
        raise ValueError(f"sinks ({sinks}) must fit in the first block (block_size {block_size})")
    AttentionInterface.register(ATTENTION_NAME, _sink_attention_forward)
    config = model.config
    previous = config._attn_implementation
    config._attn_implementation = ATTENTION_NAME  # no mask function registered: no (N x N) mask is built
    try:
        yield _SinkRun(model, block_size, memory_segments, sinks)
    finally:
        config._attn_implementation = previous
