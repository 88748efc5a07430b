"""KVCache: the static key/value cache of a decode, laid out for decode reads.

Layout k, v: [L, B, Hkv, S, D], so one sequence's keys of one kv head, [S, D], are one
contiguous block and a sequence's whole layer, [Hkv, S, D], is contiguous too: decode
attention streams it front to back. Sized once from max_seq; nothing reallocates per step.
The same layout is the k_cache/v_cache buffer of the megakernel (scheduler/isa.py).
"""
from __future__ import annotations

from typing import Union

import torch

from .config import ModelConfig


class KVCache:
    def __init__(self, cfg: ModelConfig, batch: int, max_seq: int,
                 dtype: torch.dtype = torch.bfloat16, device="cpu"):
        for name, value in (("batch", batch), ("max_seq", max_seq)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"KVCache: {name} must be a positive int, got {value!r}")
        self.config, self.batch, self.max_seq = cfg, batch, max_seq
        shape = (cfg.L, batch, cfg.Hkv, max_seq, cfg.D)
        self.k = torch.zeros(shape, dtype=dtype, device=device)  # [L, B, Hkv, S, D]
        self.v = torch.zeros(shape, dtype=dtype, device=device)  # [L, B, Hkv, S, D]

    @property
    def dtype(self) -> torch.dtype:
        return self.k.dtype

    @property
    def device(self) -> torch.device:
        return self.k.device

    def nbytes(self) -> int:
        return 2 * self.k.numel() * self.k.element_size()

    def check_position(self, pos: int) -> None:
        """Raise ValueError unless position `pos` fits in the cache."""
        if not 0 <= pos < self.max_seq:
            raise ValueError(f"KV cache position {pos} is outside [0, max_seq={self.max_seq}); "
                             f"raise max_seq (or reset the sequence)")

    def write(self, layer: int, pos: Union[int, torch.Tensor], k: torch.Tensor,
              v: torch.Tensor) -> None:
        """Store this step's keys and values of every sequence at position `pos`.

        layer: int; pos: an int (checked here) or a [1] int64 tensor on the cache's device
        (capture-safe: no host sync, the caller checked it); k, v: [B, Hkv, D].
        """
        if not isinstance(pos, torch.Tensor):
            self.check_position(pos)
            pos = torch.tensor([pos], device=self.device)
        self.k[layer].index_copy_(2, pos, k.unsqueeze(2).to(self.dtype))
        self.v[layer].index_copy_(2, pos, v.unsqueeze(2).to(self.dtype))

    def reset(self) -> None:
        """Zero the cache (positions are the owner's to track)."""
        self.k.zero_()
        self.v.zero_()
