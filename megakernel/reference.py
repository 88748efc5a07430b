"""ReferenceModel: plain eager PyTorch Llama decode (gpt-fast style), the baseline and oracle.

In bf16 it is the bench's "eager PyTorch" contender; in fp32 (weights upcast) it is the
oracle every other decoder is checked against. The math mirrors Hugging Face's
LlamaForCausalLM: RMSNorm in fp32 then cast back before the weight, RoPE from
megakernel.rope, GQA attention with an fp32 softmax, SwiGLU MLP, tied or untied head.

`forward(tokens, pos_t, kv_len)` is the whole step with no host sync and no data-dependent
Python control flow (the position is a device tensor), so it can be captured in a CUDA
graph; `step()` validates the input on the host, then calls it.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from .config import ModelConfig
from .decoding import StepDecoder
from .kv_cache import KVCache
from .rope import apply_rope, rope_tables
from .weights import LayerWeights, Weights


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x: [B, d]; weight: [d]. Normalise in fp32, cast back to x's dtype, then scale (as HF)."""
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(x.dtype)


def attention(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
              visible: torch.Tensor) -> torch.Tensor:
    """q: [B, Hkv, G, D]; keys, values: [B, Hkv, S, D]; visible: bool [S] -> [B, Hkv, G, D].
    Query head h = g*G + j reads kv head g (Hugging Face's repeat_kv order)."""
    scores = (q @ keys.transpose(-1, -2)) * q.shape[-1] ** -0.5   # [B, Hkv, G, S]
    scores = scores.masked_fill(~visible, float("-inf"))
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
    return probs @ values


def attend(cfg: ModelConfig, lw: LayerWeights, cache: KVCache, layer: int, h: torch.Tensor,
           pos_t: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
           visible: torch.Tensor) -> torch.Tensor:
    """One layer's attention up to the O-projection, for cfg's heads (a tensor-parallel
    shard config with that shard's weights and cache works alike): h: [B, d] normed input;
    pos_t: int64 [1]; cos, sin: [1, D/2]; visible: bool [kv_len] -> [B, H*D]. Writes this
    step's keys and values at pos_t into cache and reads its first kv_len positions."""
    B, H, Hkv, D = h.shape[0], cfg.H, cfg.Hkv, cfg.D
    q = apply_rope((h @ lw.wq.T).view(B, H, D), cos, sin)    # [B, H, D]
    k = apply_rope((h @ lw.wk.T).view(B, Hkv, D), cos, sin)  # [B, Hkv, D]
    v = (h @ lw.wv.T).view(B, Hkv, D)
    cache.write(layer, pos_t, k, v)
    kv_len = visible.shape[0]
    keys = cache.k[layer, :, :, :kv_len]                     # [B, Hkv, kv_len, D]
    values = cache.v[layer, :, :, :kv_len]
    return attention(q.view(B, Hkv, H // Hkv, D), keys, values, visible).reshape(B, H * D)


def swiglu(h: torch.Tensor, lw: LayerWeights) -> torch.Tensor:
    """h: [B, d] normed input -> [B, I], the input of the down projection."""
    return F.silu(h @ lw.w_gate.T) * (h @ lw.w_up.T)


class ReferenceModel(StepDecoder):
    def __init__(self, cfg: ModelConfig, weights: Weights, batch: int = 1, max_seq: int = 2048,
                 dtype: Optional[torch.dtype] = None, device=None):
        self._init_sizes(cfg, batch, max_seq)
        weights.check(cfg)
        self.weights = weights.to(device=device, dtype=dtype)
        self.dtype, self.device = self.weights.dtype, self.weights.device
        self.cache = KVCache(cfg, batch, max_seq, self.dtype, self.device)
        self.cos, self.sin = rope_tables(cfg, max_seq, self.device)  # [S, D/2] fp32 each
        self.pos = 0

    def _reset(self) -> None:
        self.cache.reset()

    def _step(self, tokens: torch.Tensor) -> torch.Tensor:
        pos_t = torch.tensor([self.pos], dtype=torch.int64, device=self.device)
        return self.forward(tokens, pos_t, kv_len=self.pos + 1)

    @torch.no_grad()
    def forward(self, tokens: torch.Tensor, pos_t: torch.Tensor,
                kv_len: Optional[int] = None) -> torch.Tensor:
        """One decode step, capture-safe: no checks, no host sync.

        tokens: int64 [B] on the model's device; pos_t: int64 [1] on the device, the position
        of these tokens; kv_len: how many cache positions attention reads (static; positions
        > pos_t are masked). None reads all max_seq (what a CUDA graph capture wants);
        step() passes pos + 1. Returns float32 logits [B, V].
        """
        cfg, w = self.config, self.weights
        kv_len = self.max_seq if kv_len is None else kv_len
        cos, sin = self.cos[pos_t], self.sin[pos_t]                  # [1, D/2]
        visible = torch.arange(kv_len, device=self.device) <= pos_t  # [kv_len]
        x = w.embed[tokens]                                          # [B, d]
        for layer, lw in enumerate(w.layers):
            h = rms_norm(x, lw.attn_norm, cfg.rms_norm_eps)
            attn = attend(cfg, lw, self.cache, layer, h, pos_t, cos, sin, visible)
            x = x + attn @ lw.wo.T
            h = rms_norm(x, lw.mlp_norm, cfg.rms_norm_eps)
            x = x + swiglu(h, lw) @ lw.w_down.T
        x = rms_norm(x, w.final_norm, cfg.rms_norm_eps)
        return (x @ w.lm_head.T).float()
