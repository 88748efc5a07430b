"""Buffers: every tensor a decode step reads or writes, exactly as scheduler/isa.py lists them.

Allocation only, device-agnostic: the CPU interpreter allocates on "cpu", the GPU runtime
reuses this class with device="cuda" and binds the tensors' pointers into its kernel
argument struct. All activations are fp32 and contiguous; the KV caches are `kv_dtype`.

Invariants:
  - shapes come from (ModelConfig, Program.batch / attn_splits / lm_slices / num_counters /
    tp, max_seq) and nothing else; under tp > 1 the ModelConfig is the rank's shard config
    and `part` (the per-source partial sums, isa.py) exists, else it is None;
  - `reset()` zeroes the synchronisation state (counters, epoch, done, error) and the KV
    caches: the state of a fresh sequence;
  - `poison()` fills everything an instruction writes (and the step inputs) with a value no
    correct step produces, NaN for floats and INT_MIN for ints, so unwritten elements show.
"""
from __future__ import annotations

import dataclasses

import torch

from .config import ModelConfig
from .rope import rope_tables

INT_POISON = -(2 ** 31)

# Written by instructions (or by the host before a step): poisoned.
STEP_OUTPUTS = ("tokens", "pos", "resid", "q", "k_cache", "v_cache", "o_part", "lse", "attn",
                "act", "logits", "amax_val", "amax_idx", "out_tokens", "part")
# Synchronisation state: zeroed by reset(). The flagged copies' (*_ll) tags are epoch + 1 of
# the step that wrote them: they must start over with the epoch.
SYNC_STATE = ("counters", "epoch", "done", "error", "claim_next", "part_ll", "q_ll", "kv_ll",
              "x_ll")


@dataclasses.dataclass
class Buffers:
    tokens: torch.Tensor      # [B] int64
    pos: torch.Tensor         # [B] int32
    resid: torch.Tensor       # [2L+1, B, d]
    q: torch.Tensor           # [L, B, H, D]
    q_ll: torch.Tensor        # [L, B, H, D/2, 4] int32: q as flagged pairs (dims u, u + D/2)
    kv_ll: torch.Tensor       # [L, B, Hkv, 2, D/2, 4] int32: this step's k (dims u, u + D/2), v
    x_ll: torch.Tensor        # [L, B, d, 2] int32: resid[2l+2] as flagged elements {x, tag}
    k_cache: torch.Tensor     # [L, B, Hkv, S, D] kv_dtype
    v_cache: torch.Tensor     # [L, B, Hkv, S, D] kv_dtype
    o_part: torch.Tensor      # [L, B, H, NS, D]
    lse: torch.Tensor         # [L, B, H, NS]
    part_ll: torch.Tensor     # [L, B, H, NS, D/2 + 1, 4] int32: o_part, lse as flagged pairs
    attn: torch.Tensor        # [L, B, H*D]
    act: torch.Tensor         # [L, B, I]
    logits: torch.Tensor      # [B, V]
    amax_val: torch.Tensor    # [B, NLM] fp32
    amax_idx: torch.Tensor    # [B, NLM] int32
    out_tokens: torch.Tensor  # [B] int64
    counters: torch.Tensor    # [num_counters] int32
    epoch: torch.Tensor       # [1] int32
    done: torch.Tensor        # [1] int32
    error: torch.Tensor       # [8] int32 watchdog record
    claim_next: torch.Tensor  # [1] int32 next unclaimed record of Program.claim (the kernel
                              # puts it back to 0 at a step's end; reset() after an error)
    rope_cos: torch.Tensor    # [S, D/2] fp32
    rope_sin: torch.Tensor    # [S, D/2] fp32
    part: torch.Tensor | None = None   # [2L, TP, B, d] under tp > 1

    @classmethod
    def allocate(cls, cfg: ModelConfig, program, max_seq: int, device="cpu",
                 kv_dtype: torch.dtype = torch.bfloat16) -> "Buffers":
        B, NS, NLM = int(program.batch), int(program.attn_splits), int(program.lm_slices)
        if max_seq < 1:
            raise ValueError(f"max_seq must be >= 1, got {max_seq}")
        L, d, I, H, Hkv, D, V, S = cfg.L, cfg.d, cfg.I, cfg.H, cfg.Hkv, cfg.D, cfg.V, max_seq

        def f32(*shape):
            return torch.zeros(shape, dtype=torch.float32, device=device)

        def i32(*shape):
            return torch.zeros(shape, dtype=torch.int32, device=device)

        cos, sin = rope_tables(cfg, max_seq, device=device)
        tp = int(getattr(program, "tp", 1))
        return cls(
            tokens=torch.zeros(B, dtype=torch.int64, device=device), pos=i32(B),
            resid=f32(2 * L + 1, B, d), q=f32(L, B, H, D),
            q_ll=i32(L, B, H, D // 2, 4), kv_ll=i32(L, B, Hkv, 2, D // 2, 4),
            x_ll=i32(L, B, d, 2),
            k_cache=torch.zeros(L, B, Hkv, S, D, dtype=kv_dtype, device=device),
            v_cache=torch.zeros(L, B, Hkv, S, D, dtype=kv_dtype, device=device),
            o_part=f32(L, B, H, NS, D), lse=f32(L, B, H, NS),
            part_ll=i32(L, B, H, NS, D // 2 + 1, 4), attn=f32(L, B, H * D),
            act=f32(L, B, I), logits=f32(B, V), amax_val=f32(B, NLM), amax_idx=i32(B, NLM),
            out_tokens=torch.zeros(B, dtype=torch.int64, device=device),
            counters=i32(int(program.num_counters)), epoch=i32(1), done=i32(1), error=i32(8),
            claim_next=i32(1),
            rope_cos=cos.contiguous(), rope_sin=sin.contiguous(),
            part=f32(2 * L, tp, B, d) if tp > 1 else None)

    def tensors(self) -> dict[str, torch.Tensor]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
                if getattr(self, f.name) is not None}

    def poison(self) -> "Buffers":
        for name in STEP_OUTPUTS:
            t = getattr(self, name)
            if t is None:
                continue
            t.fill_(float("nan") if t.is_floating_point() else INT_POISON)
        return self

    def reset(self) -> "Buffers":
        for name in SYNC_STATE + ("k_cache", "v_cache"):
            getattr(self, name).zero_()
        return self

    def flag_partials(self, tag: int) -> "Buffers":
        """part_ll <- o_part and lse as flagged pairs tagged `tag`: what ATTN writes in a
        -DMK_LL_PARTIALS=1 build at epoch tag - 1 (op tests hand ATTN_REDUCE its inputs so)."""
        self.part_ll.copy_(flagged_partials(self.o_part, self.lse, tag))
        return self

    def flag_queries(self, tag: int) -> "Buffers":
        """q_ll and kv_ll from q and the caches at each row's position, tagged `tag`: what
        QKV writes in a -DMK_LL_Q=1 build at epoch tag - 1 (op tests hand ATTN its inputs so)."""
        L, B, H, D = self.q.shape
        half = D // 2
        self.q_ll.copy_(_units(self.q[..., :half], self.q[..., half:], tag))
        at = self.pos.long().clamp(0, self.k_cache.shape[3] - 1).view(1, B, 1, 1, 1)
        k = self.k_cache.float().gather(3, at.expand(L, B, self.k_cache.shape[2], 1, D))[:, :, :, 0]
        v = self.v_cache.float().gather(3, at.expand(L, B, self.v_cache.shape[2], 1, D))[:, :, :, 0]
        self.kv_ll[:, :, :, 0] = _units(k[..., :half], k[..., half:], tag)
        self.kv_ll[:, :, :, 1] = _units(v[..., 0::2], v[..., 1::2], tag)
        return self

    def flag_resid(self, tag: int) -> "Buffers":
        """x_ll[l] <- resid[2l+2] as flagged elements {x, tag}: what DOWN of layer l writes in a
        -DMK_LL_X=1 build at epoch tag - 1 (op tests hand QKV / LMHEAD their input so)."""
        x = self.resid[2::2].contiguous().view(torch.int32)
        self.x_ll.copy_(torch.stack([x, torch.full_like(x, tag)], dim=-1))
        return self

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors().values())


def flagged_partials(o_part: torch.Tensor, lse: torch.Tensor, tag: int) -> torch.Tensor:
    """[..., NS, D] o_part and [..., NS] lse -> [..., NS, D/2 + 1, 4] int32 units
    {x, tag, x', tag}: dims (2u, 2u + 1) in unit u, lse twice in unit D/2 (isa.py part_ll)."""
    lse = lse.unsqueeze(-1)
    return torch.cat([_units(o_part[..., 0::2], o_part[..., 1::2], tag), _units(lse, lse, tag)],
                     dim=-2)


def _units(x0: torch.Tensor, x1: torch.Tensor, tag: int) -> torch.Tensor:
    """Flagged pairs {x0, tag, x1, tag} (int32 [..., 4]) of two fp32 tensors of one shape."""
    t = torch.full_like(x0, tag, dtype=torch.int32)
    return torch.stack([x0.float().contiguous().view(torch.int32), t,
                        x1.float().contiguous().view(torch.int32), t], dim=-1)
