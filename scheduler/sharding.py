"""Tensor-parallel sharding (Megatron style), shared by the scheduler and the weight packer.

Rank r of TP owns kv groups [r*Hkv/TP, (r+1)*Hkv/TP) (their q heads, QKV rows and O-proj
columns), FFN units [r*I/TP, (r+1)*I/TP) (gate/up rows, down columns) and vocab rows
vocab_rows(V, TP)[r] of the LM head. The shard config is the model a rank computes locally.
"""
from __future__ import annotations

from megakernel.config import ModelConfig

from .slicing import even_split


def check_tp(cfg: ModelConfig, tp: int) -> None:
    """ValueError naming tp unless it divides the kv heads and the FFN size."""
    for what, n in (("num_kv_heads", cfg.Hkv), ("intermediate_size", cfg.I)):
        if n % tp:
            raise ValueError(f"tp={tp} must divide {what} ({n}) of {cfg.name!r}")


def shard_config(cfg: ModelConfig, tp: int) -> ModelConfig:
    """The per-rank model: H/tp heads, Hkv/tp kv heads, I/tp FFN; everything else equal."""
    check_tp(cfg, tp)
    if tp == 1:
        return cfg
    return cfg.replace(name=f"{cfg.name}/tp{tp}", num_heads=cfg.H // tp,
                       num_kv_heads=cfg.Hkv // tp, intermediate_size=cfg.I // tp,
                       head_dim=cfg.D)


def vocab_rows(V: int, tp: int) -> list[tuple[int, int]]:
    """(first row, rows) of the LM head each rank owns: V/tp rounded, uneven allowed."""
    return even_split(V, tp)
