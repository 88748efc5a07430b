"""Buffer accesses: which elements each instruction reads and writes, derived from its
record alone by the semantics in isa.py, as [start, stop) ranges of flat element indices.

The validator works in its own coordinates: every buffer's element space is numbered in
an order chosen so that each access is one range (or one per batch row). Each order is a
bijection of the real layout, so overlaps and coverage, all the validator asks about, do
not depend on it. Orders (outer to inner, see buffer_dims):
    resid [level, col, b]          q [layer, b, head, dim*]      k_new, v_new [layer, b, g, dim*]
    o_part [layer, b, head, split, dim]   lse [layer, b, head, split]   (the kernel's layout)
    attn [layer, b, head, dim]     act [layer, col, b]           logits [row, b]
    amax_val, amax_idx [slot, b]   out_tokens [b]   part [level, src, col, b] (tp > 1)
Under tp > 1 coordinates are the rank's own (shard config); `remote` marks the writes that
land in every rank's copy (all_ranks), and `src` in part is the writing rank.
dim* is the packed-row order inside a head (pair-interleaved, isa.py); every reader reads
whole heads, so that permutation is invisible. k_new / v_new are the KV cache rows at this
step's position (earlier positions were written by earlier steps). tokens, pos, the
weights and the RoPE tables are inputs: written before the step, not tracked.
An accumulating write (`add`: ATTN_OPROJ's atomic adds into resid[2l+1], a K-sliced DOWN's
into resid[2l+2], and with copy into resid[2l+3]) is a write that is not SSA: dataflow.py
checks it against the element's one ordinary writer and readers.
attn is not allocated (layer size 0) in a plan with ATTN_OPROJ, which writes none of it.
"""
from __future__ import annotations

import dataclasses

import numpy as np

from megakernel.config import ModelConfig

from . import isa
from .isa import Op
from .table import Instrs


BUFFERS = ("resid", "q", "k_new", "v_new", "o_part", "lse", "attn", "act", "logits", "amax_val",
           "amax_idx", "out_tokens", "part")


def buffer_dims(cfg: ModelConfig, B: int, NS: int, NLM: int, tp: int = 1,
                merged: bool = True) -> dict[str, tuple]:
    """buffer -> ((dim name, size), ...) in validator coordinates, for every name in BUFFERS.
    merged: the plan merges attention into attn (False: ATTN_OPROJ, attn has no layers)."""
    L, d, H, Hkv, G, D = cfg.L, cfg.d, cfg.H, cfg.Hkv, cfg.G, cfg.D
    lb = (("layer", L), ("b", B))
    return {
        "resid": (("level", 2 * L + 1), ("col", d), ("b", B)),
        "q": lb + (("head", H), ("dim", D)),
        "k_new": lb + (("kv_head", Hkv), ("dim", D)),
        "v_new": lb + (("kv_head", Hkv), ("dim", D)),
        "o_part": lb + (("head", H), ("split", NS), ("dim", D)),
        "lse": lb + (("head", H), ("split", NS)),
        "attn": (("layer", L if merged else 0), ("b", B), ("head", H), ("dim", D)),
        "act": (("layer", L), ("col", cfg.I), ("b", B)),
        "logits": (("row", cfg.V), ("b", B)),
        "amax_val": (("slot", NLM), ("b", B)),
        "amax_idx": (("slot", NLM), ("b", B)),
        "out_tokens": (("b", B),),
        "part": (("level", 2 * L if tp > 1 else 0), ("src", tp), ("col", d), ("b", B)),
    }


@dataclasses.dataclass
class Accesses:
    inst: np.ndarray    # int64 [A] row of the instruction table
    buf: np.ndarray     # int64 [A] index into BUFFERS
    start: np.ndarray   # int64 [A]
    stop: np.ndarray    # int64 [A] (exclusive)
    write: np.ndarray   # bool [A]
    remote: np.ndarray  # bool [A] a write into every rank's copy
    add: np.ndarray     # bool [A] an accumulating write (atomic adds onto an initial value)


def accesses(t: Instrs, cfg: ModelConfig, B: int, NS: int, NLM: int, tp: int = 1,
             rank: np.ndarray | None = None) -> Accesses:
    """Every read and write of every instruction in t (whose fields are in range); rank:
    each instruction's rank (tp > 1)."""
    L, d, I, H, Hkv, G, D = cfg.L, cfg.d, cfg.I, cfg.H, cfg.Hkv, cfg.G, cfg.D
    parts = []

    def emit(name, write, inst, start, length, local=False, add=False):
        """local: a write into the rank's own copy even where the instruction is all_ranks;
        add: an accumulating write."""
        start = np.asarray(start, np.int64) + np.zeros(len(inst), np.int64)
        parts.append((inst, np.full(len(inst), BUFFERS.index(name)), start,
                      start + length, np.full(len(inst), write),
                      np.full(len(inst), write and not local) & (t.all_ranks[inst] != 0),
                      np.full(len(inst), add)))

    def part_cols(level, src, col0):     # start of part[level][src][:, col0]
        return ((level * tp + src) * d + col0) * B

    src = np.zeros(len(t), np.int64) if rank is None else rank.astype(np.int64)

    def rows(op):
        i = np.flatnonzero(t.op == op)
        a = t.args[i].astype(np.int64)
        return i, t.layer[i].astype(np.int64), a[:, 0], a[:, 1], a[:, 2]

    def resid_cols(level, col0):          # start of resid[level][:, col0]
        return (level * d + col0) * B

    def read_input(op, i, level):         # a matvec's resid[level], folded or not (isa.py)
        a = t.args[i].astype(np.int64)
        k = isa.word_index(op, "fold") - len(isa.HEADER)
        f = a[:, k] != 0
        emit("resid", False, i[~f], resid_cols(level[~f], 0), d * B)
        i, level, c0, n = i[f], level[f], a[f, k + 1], a[f, k + 2]
        emit("resid", False, i, resid_cols(level - 1, 0), d * B)
        for s in range(tp):
            emit("part", False, i, part_cols(level - 1, s, 0), d * B)
        m = n > 0                         # a stage may have more readers than ranges
        emit("resid", True, i[m], resid_cols(level[m], c0[m]), n[m] * B, local=True)

    i, _, c0, n, copy = rows(Op.EMBED)
    emit("resid", True, i, resid_cols(0, c0), n * B)
    m = copy != 0
    emit("resid", True, i[m], resid_cols(1, c0[m]), n[m] * B)

    i, l, r0, n, _ = rows(Op.QKV)
    read_input(Op.QKV, i, 2 * l)
    R, r1 = (G + 2) * D, r0 + n
    g0, g1 = r0 // R, (r1 - 1) // R
    o0, o1 = r0 - g0 * R, r1 - g1 * R           # offsets of the ends inside their groups
    for name, width, before in (("q", G * D, 0), ("k_new", D, G * D), ("v_new", D, (G + 1) * D)):
        lo = g0 * width + np.clip(o0 - before, 0, width)     # this part's rows of each group
        hi = g1 * width + np.clip(o1 - before, 0, width)     # sit at [before, before + width)
        m = hi > lo
        for b in range(B):
            emit(name, True, i[m], (l[m] * B + b) * Hkv * width + lo[m], hi[m] - lo[m])

    i, l, b, g, s = rows(Op.ATTN)
    lbg = (l * B + b) * Hkv + g
    emit("q", False, i, lbg * G * D, G * D)
    emit("k_new", False, i, lbg * D, D)
    emit("v_new", False, i, lbg * D, D)
    for j in range(G):                          # split s of each q head of the group
        emit("o_part", True, i, ((lbg * G + j) * NS + s) * D, D)
        emit("lse", True, i, (lbg * G + j) * NS + s, 1)
    # A merging group's attn is booked on split NS-1 (validate.py: whichever split merges,
    # the readers follow all of them); its reads of the partials are ordered by the ticket.
    m = (t.args[i, 3] != 0) & (s == NS - 1)
    emit("attn", True, i[m], lbg[m] * G * D, G * D)

    i, l, b, g, _ = rows(Op.ATTN_REDUCE)
    h0, nh = (t.args[i, k].astype(np.int64) for k in (2, 3))
    lh = (l * B + b) * H + g * G + h0           # first q head, as (layer, b, head)
    emit("o_part", False, i, lh * NS * D, nh * NS * D)
    emit("lse", False, i, lh * NS, nh * NS)
    emit("attn", True, i, lh * D, nh * D)

    def add_to_resid(i, level, r0, n):      # OPROJ / DOWN: resid[level + 1] or a partial
        m = t.all_ranks[i] != 0
        emit("part", True, i[m], part_cols(level[m], src[i[m]], r0[m]), n[m] * B)
        i, level, r0, n = i[~m], level[~m], r0[~m], n[~m]
        emit("resid", False, i, resid_cols(level, r0), n * B)
        emit("resid", True, i, resid_cols(level + 1, r0), n * B)

    i, l, h, dim0, ndims = rows(Op.ATTN_OPROJ)
    col0, ncols = (t.args[i, k].astype(np.int64) for k in (3, 4))
    lh = (l[:, None] * B + np.arange(B)) * H + h[:, None]          # [n, B] (layer, b, head)
    split = lh[:, :, None] * NS + np.arange(NS)                     # [n, B, NS] + split
    emit("o_part", False, i.repeat(B * NS), (split * D + dim0[:, None, None]).ravel(),
         ndims.repeat(B * NS))
    emit("lse", False, i.repeat(B), lh.ravel() * NS, NS)
    emit("resid", True, i, resid_cols(2 * l + 1, col0), ncols * B, add=True)

    i, l, r0, n, copy = rows(Op.OPROJ)
    emit("attn", False, i, l * B * H * D, B * H * D)
    add_to_resid(i, 2 * l, r0, n)
    m = copy != 0                               # the initial value of K-sliced DOWNs' adds
    emit("resid", True, i[m], resid_cols(2 * l[m] + 2, r0[m]), n[m] * B)

    i, l, r0, n, _ = rows(Op.GATEUP)
    read_input(Op.GATEUP, i, 2 * l + 1)
    emit("act", True, i, (l * I + r0 // 2) * B, n // 2 * B)
    c0, nc, copy = (t.args[i, k].astype(np.int64) for k in (3, 4, 5))
    for level, m in ((2 * l + 2, copy > 0), (2 * l + 3, copy > 1)):   # initial values of adds
        m &= nc > 0
        emit("resid", True, i[m], resid_cols(level[m], c0[m]), nc[m] * B)

    i, l, r0, n, copy = rows(Op.DOWN)
    k0, kn = (t.args[i, k].astype(np.int64) for k in (3, 4))
    s = kn > 0                                  # K slices: adds onto OPROJ's / GATEUP's copy
    emit("act", False, i[s], (l[s] * I + k0[s]) * B, kn[s] * B)
    emit("resid", True, i[s], resid_cols(2 * l[s] + 2, r0[s]), n[s] * B, add=True)
    m = s & (copy != 0)                         # and onto GATEUP's second copy
    emit("resid", True, i[m], resid_cols(2 * l[m] + 3, r0[m]), n[m] * B, add=True)
    i, l, r0, n, copy = i[~s], l[~s], r0[~s], n[~s], copy[~s]
    emit("act", False, i, l * I * B, I * B)
    add_to_resid(i, 2 * l + 1, r0, n)
    m = copy != 0
    emit("resid", True, i[m], resid_cols(2 * l[m] + 3, r0[m]), n[m] * B)

    i, l, r0, n, after_mlp = rows(Op.RESID_SUM)
    level = 2 * l + after_mlp
    emit("resid", False, i, resid_cols(level, r0), n * B)
    for s in range(tp):
        emit("part", False, i, part_cols(level, s, r0), n * B)
    emit("resid", True, i, resid_cols(level + 1, r0), n * B)

    i, _, r0, n, slot = rows(Op.LMHEAD)
    read_input(Op.LMHEAD, i, np.full(len(i), 2 * L, np.int64))
    emit("logits", True, i, r0 * B, n * B)
    emit("amax_val", True, i, slot * B, B)
    emit("amax_idx", True, i, slot * B, B)

    i, *_ = rows(Op.ARGMAX)
    emit("amax_val", False, i, 0, NLM * B)
    emit("amax_idx", False, i, 0, NLM * B)
    emit("out_tokens", True, i, 0, B)

    cols = [np.concatenate(c) for c in zip(*parts)]
    return Accesses(*cols)
