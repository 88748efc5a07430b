"""PyTorch reference of every opcode: the oracle the CPU interpreter runs and the GPU op tests
compare against.

Each function is `op(rec, w, buf, prog)`: `rec` a record decoded by isa.decode, `w` the
PackedWeights, `buf` the Buffers, `prog` the Program (its attn_splits). It reads and writes
only the buffers isa.py names for that opcode (a merging ATTN also its ticket counter),
keeps no other state, and so runs alone on a one-instruction Program. Arithmetic is fp32
(weights cast up); K and V are stored in the cache's dtype. `run` dispatches on rec["op"]; an opcode without a reference raises.

Tensor parallelism: `buf` is the executing rank's Buffers, `w` its weight shard, `prog` its
Program (prog.rank); a record with all_ranks stores into every Buffers of `peers` (all
ranks', in rank order), as the kernel's peer stores will.
"""
from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F

from .config import ModelConfig
from .packing import qkv_row_sources
from .scheduler.isa import Op


def rmsnorm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x: [B, d] fp32, weight: [d] -> [B, d] fp32."""
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight.float()


@functools.lru_cache(maxsize=8)
def qkv_row_targets(cfg: ModelConfig) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """For each packed QKV row: (q/k/v as 0/1/2, q head or kv head, unpacked dim)."""
    which, rows = qkv_row_sources(cfg)
    return which, rows // cfg.D, rows % cfg.D


def embed(rec, w, buf, prog):
    c0, n = rec["col0"], rec["ncols"]
    buf.resid[0, :, c0:c0 + n] = w.embed[buf.tokens, c0:c0 + n].float()
    if rec.get("copy", 0):
        buf.resid[1, :, c0:c0 + n] = buf.resid[0, :, c0:c0 + n]


def matvec_input(rec, buf, level: int) -> torch.Tensor:
    """resid[level] [B, d], or under fold (isa.py) resid[level-1] plus the tp partials of
    level-1, summed in rank order; the record's column range of it is written to
    resid[level]."""
    if not rec.get("fold", 0):
        return buf.resid[level]
    x = buf.resid[level - 1]
    for src in range(buf.part.shape[1]):                                  # fixed order
        x = x + buf.part[level - 1, src]
    c0, n = rec["sum_col0"], rec["sum_ncols"]
    buf.resid[level, :, c0:c0 + n] = x[:, c0:c0 + n]
    return x


def qkv(rec, w, buf, prog):
    cfg, l, r0, n = w.config, rec["layer"], rec["row0"], rec["nrows"]
    x = rmsnorm(matvec_input(rec, buf, 2 * l), w.attn_norm[l], cfg.rms_norm_eps)  # [B, d]
    y = x @ w.wqkv[l, r0:r0 + n].float().T                                 # [B, n]
    which, head, dim = (t[r0:r0 + n] for t in qkv_row_targets(cfg))
    pos = buf.pos.long()                                                   # [B]
    # Rows 2p, 2p+1 of a q/k head hold dims (p, p + D/2): rotate each pair by angle p.
    rotate = which[0::2] < 2                                               # [n/2]
    pair = torch.where(rotate, dim[0::2], 0)
    cos, sin = buf.rope_cos[pos][:, pair], buf.rope_sin[pos][:, pair]      # [B, n/2]
    lo, hi = y[:, 0::2], y[:, 1::2]
    y = y.clone()
    y[:, 0::2] = torch.where(rotate, lo * cos - hi * sin, lo)
    y[:, 1::2] = torch.where(rotate, hi * cos + lo * sin, hi)
    is_q = which == 0
    buf.q[l][:, head[is_q], dim[is_q]] = y[:, is_q]
    b = torch.arange(len(pos))[:, None]
    for kind, cache in ((1, buf.k_cache), (2, buf.v_cache)):
        sel = which == kind
        cache[l][b, head[sel][None, :], pos[:, None], dim[sel][None, :]] = (
            y[:, sel].to(cache.dtype))


def split_range(n: int, splits: int, s: int) -> tuple[int, int]:
    """Positions [lo, hi) of split s when n positions are cut into `splits` (isa.py ATTN)."""
    c = -(-n // splits)
    return min(n, s * c), min(n, (s + 1) * c)


def attn(rec, w, buf, prog):
    _attn_split(rec, w, buf, prog)
    if rec.get("merge", 0):
        # The ticket (isa.py ATTN merge): the split whose add reaches target * (epoch + 1)
        # is the group's last and merges it.
        t = rec["ticket"]
        buf.counters[t] += 1
        need = int(prog.counter_targets[t]) * (int(buf.epoch[0]) + 1)
        if (int(buf.counters[t]) - need) % 2 ** 32 == 0:
            g = rec["kv_head"]
            _merge(w.config, buf, rec["layer"], rec["b"], g * w.config.G, w.config.G)


def _attn_split(rec, w, buf, prog):
    cfg, l, b, g, s = w.config, rec["layer"], rec["b"], rec["kv_head"], rec["split"]
    heads = slice(g * cfg.G, (g + 1) * cfg.G)
    lo, hi = split_range(int(buf.pos[b]) + 1, int(prog.attn_splits), s)
    if lo == hi:
        buf.o_part[l, b, heads, s] = 0.0
        buf.lse[l, b, heads, s] = -math.inf
        return
    q = buf.q[l, b, heads]                                                 # [G, D]
    k = buf.k_cache[l, b, g, lo:hi].float()                                # [m, D]
    v = buf.v_cache[l, b, g, lo:hi].float()                                # [m, D]
    scores = (q @ k.T) / math.sqrt(cfg.D)                                  # [G, m]
    top = scores.max(-1, keepdim=True).values
    p = torch.exp(scores - top)
    total = p.sum(-1, keepdim=True)
    buf.o_part[l, b, heads, s] = (p @ v) / total
    buf.lse[l, b, heads, s] = (top + torch.log(total)).squeeze(-1)


def attn_reduce(rec, w, buf, prog):
    cfg = w.config
    _merge(cfg, buf, rec["layer"], rec["b"], rec["kv_head"] * cfg.G + rec["head0"],
           rec["nheads"])


def _merge(cfg, buf, l: int, b: int, h0: int, nh: int):
    """attn[l, b] of q heads h0 .. h0+nh-1 from their NS partials."""
    heads = slice(h0, h0 + nh)
    merged = _merged(buf.lse[l, b, heads], buf.o_part[l, b, heads])        # [nh, D]
    buf.attn[l, b, heads.start * cfg.D:heads.stop * cfg.D] = merged.reshape(-1)


def _merged(lse: torch.Tensor, o: torch.Tensor) -> torch.Tensor:
    """lse [..., NS], o [..., NS, n] partials -> [..., n] merged outputs."""
    top = lse.max(-1, keepdim=True).values
    top = torch.where(torch.isfinite(top), top, torch.zeros_like(top))
    weight = torch.exp(lse - top)                                          # empty split -> 0
    return (weight[..., None] * o).sum(-2) / weight.sum(-1, keepdim=True)


def attn_oproj(rec, w, buf, prog):
    """Merges of one q head's dim slice for every b, times the matching wo_t rows' column
    slice, added into resid[2l+1] (onto the copy of resid[2l] that EMBED or the last DOWN
    stored)."""
    if w.wo_t is None:
        raise ValueError("ATTN_OPROJ reads wo_t, which these packed weights lack: pack them "
                         "with megakernel.packing.add_wo_t")
    l, h, j0, n, D = rec["layer"], rec["head"], rec["dim0"], rec["ndims"], w.config.D
    c0, c1 = rec["col0"], rec["col0"] + rec["ncols"]
    m = _merged(buf.lse[l, :, h], buf.o_part[l, :, h, :, j0:j0 + n])       # [B, n]
    buf.resid[2 * l + 1, :, c0:c1] += m @ w.wo_t[l, h * D + j0:h * D + j0 + n, c0:c1].float()


def oproj(rec, w, buf, prog):
    l, r0, n = rec["layer"], rec["row0"], rec["nrows"]
    buf.resid[2 * l + 1, :, r0:r0 + n] = (
        buf.resid[2 * l, :, r0:r0 + n] + buf.attn[l] @ w.wo[l, r0:r0 + n].float().T)
    if rec.get("copy", 0):
        buf.resid[2 * l + 2, :, r0:r0 + n] = buf.resid[2 * l + 1, :, r0:r0 + n]


def partial(rec, w, buf, prog, peers):
    """OPROJ / DOWN under tp: this rank's partial of every row, into part[..][rank] of all."""
    l, r0, n = rec["layer"], rec["row0"], rec["nrows"]
    mlp = rec["op"] == Op.DOWN
    x, weight = (buf.act[l], w.wdown[l]) if mlp else (buf.attn[l], w.wo[l])
    y = x @ weight[r0:r0 + n].float().T
    for peer in peers:
        peer.part[2 * l + mlp, prog.rank, :, r0:r0 + n] = y


def resid_sum(rec, w, buf, prog):
    level, r0, n = 2 * rec["layer"] + rec["after_mlp"], rec["row0"], rec["nrows"]
    acc = buf.resid[level, :, r0:r0 + n]
    for src in range(buf.part.shape[1]):                                  # fixed order
        acc = acc + buf.part[level, src, :, r0:r0 + n]
    buf.resid[level + 1, :, r0:r0 + n] = acc


def gateup(rec, w, buf, prog):
    cfg, l, r0, n = w.config, rec["layer"], rec["row0"], rec["nrows"]
    x = rmsnorm(matvec_input(rec, buf, 2 * l + 1), w.mlp_norm[l], cfg.rms_norm_eps)
    y = x @ w.wgu[l, r0:r0 + n].float().T                                  # [B, n]
    buf.act[l, :, r0 // 2:(r0 + n) // 2] = F.silu(y[:, 0::2]) * y[:, 1::2]
    copy = rec.get("copy", 0)
    if copy:  # the initial value of the K-sliced DOWN adds (and of the next ATTN_OPROJ's)
        c0, c1 = rec["sum_col0"], rec["sum_col0"] + rec["sum_ncols"]
        for level in range(2 * l + 2, 2 * l + 2 + copy):
            buf.resid[level, :, c0:c1] = buf.resid[2 * l + 1, :, c0:c1]


def down(rec, w, buf, prog):
    l, r0, n, k0, kn = rec["layer"], rec["row0"], rec["nrows"], rec["k0"], rec["kn"]
    if kn:  # a K slice, added onto OPROJ's or GATEUP's copy (copy: onto both of GATEUP's)
        y = buf.act[l, :, k0:k0 + kn] @ w.wdown[l, r0:r0 + n, k0:k0 + kn].float().T
        for level in range(2 * l + 2, 2 * l + 3 + rec.get("copy", 0)):
            buf.resid[level, :, r0:r0 + n] += y
        return
    buf.resid[2 * l + 2, :, r0:r0 + n] = (
        buf.resid[2 * l + 1, :, r0:r0 + n] + buf.act[l] @ w.wdown[l, r0:r0 + n].float().T)
    if rec.get("copy", 0):
        buf.resid[2 * l + 3, :, r0:r0 + n] = buf.resid[2 * l + 2, :, r0:r0 + n]


def lmhead(rec, w, buf, prog, peers=None):
    cfg, r0, n, slot = w.config, rec["row0"], rec["nrows"], rec["slot"]
    x = rmsnorm(matvec_input(rec, buf, 2 * cfg.L), w.final_norm, cfg.rms_norm_eps)
    logits = x @ w.lm_head[r0 - w.vocab0:r0 - w.vocab0 + n].float().T      # [B, n]
    # first max on ties; a NaN logit never wins (as the kernel's compare: torch's argmax
    # would pick it)
    best = logits.nan_to_num(nan=-math.inf, posinf=math.inf, neginf=-math.inf).argmax(-1)
    for out in peers or [buf]:
        out.logits[:, r0:r0 + n] = logits
        out.amax_val[:, slot] = logits.gather(1, best[:, None]).squeeze(1)
        out.amax_idx[:, slot] = (best + r0).to(torch.int32)


def argmax(rec, w, buf, prog):
    val, idx = buf.amax_val, buf.amax_idx                                  # [B, NLM]
    top = val.max(-1, keepdim=True).values
    lowest = torch.where(val == top, idx, torch.iinfo(torch.int32).max).min(-1).values
    buf.out_tokens.copy_(lowest.to(torch.int64))


OPS = {Op.EMBED: embed, Op.QKV: qkv, Op.ATTN: attn, Op.ATTN_REDUCE: attn_reduce,
       Op.OPROJ: oproj, Op.GATEUP: gateup, Op.DOWN: down, Op.LMHEAD: lmhead, Op.ARGMAX: argmax,
       Op.RESID_SUM: resid_sum, Op.ATTN_OPROJ: attn_oproj}
ALL_RANK_OPS = {Op.OPROJ: partial, Op.DOWN: partial, Op.LMHEAD: lmhead}


def run(rec: dict, w, buf, prog, peers=None) -> None:
    """Execute one decoded instruction on the buffers; peers: every rank's Buffers (tp > 1)."""
    remote = rec.get("all_ranks", 0)
    fn = (ALL_RANK_OPS if remote else OPS).get(rec["op"])
    if fn is None:
        raise ValueError(f"no reference for opcode {rec['op']!r} (uid {rec.get('uid')}, "
                         f"all_ranks {remote}); executable opcodes: {[op.name for op in OPS]}")
    if remote:
        fn(rec, w, buf, prog, peers)
    else:
        fn(rec, w, buf, prog)
