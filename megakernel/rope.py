"""Rotary position embedding tables with Llama-3 frequency scaling.

One function computes the inverse frequencies; the reference model, the CPU interpreter and
the GPU runtime all take cos/sin from `rope_tables`, so they rotate by identical angles.
Convention (Hugging Face "rotate_half"): dims p and p + D/2 form a pair,
    out[p]       = x[p] * cos - x[p + D/2] * sin
    out[p + D/2] = x[p + D/2] * cos + x[p] * sin
"""
from __future__ import annotations

import math

import torch

from .config import ModelConfig


def inv_frequencies(cfg: ModelConfig) -> torch.Tensor:
    """[D/2] float64 inverse frequencies, Llama-3 scaled when cfg.rope_scaling is set."""
    D = cfg.head_dim
    inv = 1.0 / (cfg.rope_theta ** (torch.arange(0, D, 2, dtype=torch.float64) / D))
    rs = cfg.rope_scaling
    if rs is None:
        return inv
    low_wavelen = rs.original_max_position_embeddings / rs.low_freq_factor
    high_wavelen = rs.original_max_position_embeddings / rs.high_freq_factor
    wavelen = 2 * math.pi / inv
    scaled = torch.where(wavelen > low_wavelen, inv / rs.factor, inv)
    smooth = (rs.original_max_position_embeddings / wavelen - rs.low_freq_factor) / (
        rs.high_freq_factor - rs.low_freq_factor)
    smoothed = (1 - smooth) * scaled / rs.factor + smooth * scaled
    medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return torch.where(medium, smoothed, scaled)


def rope_tables(cfg: ModelConfig, max_seq: int, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin: [max_seq, D/2] float32 for positions 0..max_seq-1."""
    pos = torch.arange(max_seq, dtype=torch.float64)
    angles = torch.outer(pos, inv_frequencies(cfg))
    return (angles.cos().to(torch.float32).to(device), angles.sin().to(torch.float32).to(device))


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: [..., D]; cos, sin: broadcastable to [..., D/2]. Returns the rotated x (x's dtype)."""
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half].float(), x[..., half:].float()
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).to(x.dtype)
