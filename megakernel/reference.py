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
from .kv_cache import KVCache
from .rope import apply_rope, rope_tables
from .weights import Weights


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x: [B, d]; weight: [d]. Normalise in fp32, cast back to x's dtype, then scale (as HF)."""
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(x.dtype)


class ReferenceModel:
    def __init__(self, cfg: ModelConfig, weights: Weights, batch: int = 1, max_seq: int = 2048,
                 dtype: Optional[torch.dtype] = None, device=None):
        for name, value in (("batch", batch), ("max_seq", max_seq)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"ReferenceModel: {name} must be a positive int, got {value!r}")
        if max_seq > cfg.max_position_embeddings:
            raise ValueError(f"ReferenceModel: max_seq {max_seq} exceeds the model's "
                             f"max_position_embeddings {cfg.max_position_embeddings}; lower it")
        weights.check(cfg)
        self.config, self.batch, self.max_seq = cfg, batch, max_seq
        self.weights = weights.to(device=device, dtype=dtype)
        self.dtype, self.device = self.weights.dtype, self.weights.device
        self.cache = KVCache(cfg, batch, max_seq, self.dtype, self.device)
        self.cos, self.sin = rope_tables(cfg, max_seq, self.device)  # [S, D/2] fp32 each
        self.pos = 0

    def reset(self) -> None:
        """Start new sequences: position 0, empty cache."""
        self.pos = 0
        self.cache.reset()

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens: int64 [B], one per sequence at position self.pos -> float32 logits [B, V]."""
        self._check_tokens(tokens)
        if self.pos >= self.max_seq:
            raise ValueError(f"ReferenceModel: all {self.max_seq} positions are used; construct "
                             "it with a larger max_seq or call reset()")
        pos_t = torch.tensor([self.pos], dtype=torch.int64, device=self.device)
        logits = self.forward(tokens, pos_t, kv_len=self.pos + 1)
        self.pos += 1
        return logits

    @torch.no_grad()
    def generate(self, prompt_ids: torch.Tensor, max_new_tokens: int) -> torch.Tensor:
        """Greedy decode from fresh sequences. prompt_ids: int64 [B, T] -> int64 [B, T + N]."""
        if (not isinstance(prompt_ids, torch.Tensor) or prompt_ids.dim() != 2
                or prompt_ids.shape[0] != self.batch or prompt_ids.shape[1] < 1):
            raise ValueError(f"generate: prompt_ids must be a [batch={self.batch}, T>=1] tensor, "
                             f"got {_describe(prompt_ids)}")
        if not isinstance(max_new_tokens, int) or max_new_tokens < 0:
            raise ValueError("generate: max_new_tokens must be an int >= 0, got "
                             f"{max_new_tokens!r}")
        T = prompt_ids.shape[1]
        steps = T + max(max_new_tokens, 1) - 1   # the last new token is returned, not fed
        if steps > self.max_seq:
            raise ValueError(f"generate: {T} prompt + {max_new_tokens} new tokens need {steps} "
                             f"positions, max_seq is {self.max_seq}; raise max_seq")
        self._check_tokens(prompt_ids.reshape(-1), batch=prompt_ids.numel())
        self.reset()
        out = [prompt_ids[:, t] for t in range(T)]
        logits = None
        for t in range(T):
            logits = self.step(prompt_ids[:, t])
        for i in range(max_new_tokens):
            out.append(logits.argmax(dim=-1))
            if i + 1 < max_new_tokens:
                logits = self.step(out[-1])
        return torch.stack(out, dim=1)

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
        B, H, Hkv, D = tokens.shape[0], cfg.H, cfg.Hkv, cfg.D
        kv_len = self.max_seq if kv_len is None else kv_len
        cos, sin = self.cos[pos_t], self.sin[pos_t]                  # [1, D/2]
        visible = torch.arange(kv_len, device=self.device) <= pos_t  # [kv_len]
        x = w.embed[tokens]                                          # [B, d]
        for layer, lw in enumerate(w.layers):
            h = rms_norm(x, lw.attn_norm, cfg.rms_norm_eps)
            q = apply_rope((h @ lw.wq.T).view(B, H, D), cos, sin)    # [B, H, D]
            k = apply_rope((h @ lw.wk.T).view(B, Hkv, D), cos, sin)  # [B, Hkv, D]
            v = (h @ lw.wv.T).view(B, Hkv, D)
            self.cache.write(layer, pos_t, k, v)
            keys = self.cache.k[layer, :, :, :kv_len]                # [B, Hkv, kv_len, D]
            values = self.cache.v[layer, :, :, :kv_len]
            attn = self._attention(q.view(B, Hkv, H // Hkv, D), keys, values, visible)
            x = x + attn.reshape(B, H * D) @ lw.wo.T
            h = rms_norm(x, lw.mlp_norm, cfg.rms_norm_eps)
            x = x + (F.silu(h @ lw.w_gate.T) * (h @ lw.w_up.T)) @ lw.w_down.T
        x = rms_norm(x, w.final_norm, cfg.rms_norm_eps)
        return (x @ w.lm_head.T).float()

    @staticmethod
    def _attention(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
                   visible: torch.Tensor) -> torch.Tensor:
        """q: [B, Hkv, G, D]; keys, values: [B, Hkv, S, D]; visible: bool [S] -> [B, Hkv, G, D].
        Query head h = g*G + j reads kv head g (Hugging Face's repeat_kv order)."""
        scores = (q @ keys.transpose(-1, -2)) * q.shape[-1] ** -0.5   # [B, Hkv, G, S]
        scores = scores.masked_fill(~visible, float("-inf"))
        probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
        return probs @ values

    def _check_tokens(self, tokens, batch: Optional[int] = None) -> None:
        batch = self.batch if batch is None else batch
        if (not isinstance(tokens, torch.Tensor) or tokens.dtype != torch.int64
                or tuple(tokens.shape) != (batch,)):
            raise ValueError(f"tokens must be an int64 tensor of shape [{batch}], got "
                             f"{_describe(tokens)}")
        if tokens.device != self.device:
            raise ValueError(f"tokens are on {tokens.device}, the model is on {self.device}; "
                             f"move them with .to({str(self.device)!r})")
        bad = (tokens < 0) | (tokens >= self.config.V)
        if bool(bad.any()):
            raise ValueError(f"token ids {tokens[bad].tolist()[:8]} are outside the vocabulary "
                             f"[0, {self.config.V})")


def _describe(x) -> str:
    if isinstance(x, torch.Tensor):
        return f"{x.dtype} tensor of shape {list(x.shape)} on {x.device}"
    return f"{type(x).__name__}"
