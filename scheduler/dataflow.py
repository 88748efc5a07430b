"""Dataflow checks of the validator: buffers are SSA per step and every read is ordered.

On the accesses of access.py (validator coordinates), for an instruction table in uid order
whose structure validate.py has already proven:
  - every access lies inside its buffer (attn has no elements in a plan with ATTN_OPROJ);
  - no buffer element is written by two instructions (accumulations aside);
  - every element an instruction reads is written by some instruction;
  - every buffer element is written (each exactly once, with the second check);
  - every writer of an element an instruction reads happens-before that reader through
    counters (happens.py), which covers reads ordered only transitively; the waits of
    flagged readers (ATTN; at tp = 1 QKV and LMHEAD, flagged_readers) count as flagged hops:
    no transitive order passes through them.
Accumulating writes (ATTN_OPROJ's atomic adds) are not SSA writes. An accumulation reads
the element's initial value: the checks of a read (written, and its writer happens-before)
apply to it. One stage's accumulations cover identical or disjoint ranges, and every
ordinary read of an accumulated element happens after every accumulation of its range.
Reads are deduplicated by (wait signature, range) before the happens-before test, so the
work is about one test per distinct (reader signature, writer) pair.
Under tp > 1 (a merged table, ranks.py) each rank has its own copy of every buffer: an
access of rank r lands in copy r, a remote write in every copy.
"""
from __future__ import annotations

import dataclasses

import numpy as np

from megakernel.config import ModelConfig

from . import happens, isa
from .access import BUFFERS, accesses, buffer_dims
from .isa import Op
from .table import Placed

# Readers whose wait a build may replace by polling flagged data: their counter edges order
# only the signalers' own writes before them (happens.py, shallow), whatever the build.
# MK_LL_Q's ATTN (QKV's q / k / v pairs; the batch-1/2 build's default) in every plan;
# MK_LL_X's QKV of layers >= 1 and LMHEAD (DOWN's residual as flagged elements) at tp = 1
# where DOWN holds whole rows (flagged_readers; K-sliced DOWNs only add onto GATEUP's copy,
# and that build refuses such plans). MK_LL_PARTIALS (the batch-1/2 build's default since
# session 35) makes ATTN_REDUCE, and in fused plans ATTN_OPROJ (which still waits on its
# first range), such a reader too; the lowering's waits cover it (OPROJ and ATTN_OPROJ wait
# on their residual's writer themselves), but it is not modelled here: its two shallow hops
# in a row leave QKV no later descendant, which no prefix set represents cheaply (a 70B
# tp=8 plan then validates in 15 s, not 4).
FLAGGED_READERS = (int(Op.ATTN),)
X_LL_READERS = (int(Op.QKV), int(Op.LMHEAD))
_DOWN_KN = isa.ARGS[Op.DOWN].index("kn")


def flagged_readers(t: Placed, tp: int) -> np.ndarray:
    """bool [N]: the instructions whose waits count as flagged hops (FLAGGED_READERS, and
    X_LL_READERS of DOWN's residual where tp = 1 and no DOWN is a K slice)."""
    flagged = np.isin(t.op, FLAGGED_READERS)
    down = t.op == Op.DOWN
    if tp == 1 and not t.args[down, _DOWN_KN].any():
        flagged |= np.isin(t.op, X_LL_READERS) & ((t.op == Op.LMHEAD) | (t.layer > 0))
    return flagged

# (verb, producer) of a checked read, by kind: an ordinary read of a written value, an
# accumulation's read of its initial value, an ordinary read after the accumulations.
READS = (("reads", "written by"), ("accumulates into", "whose initial value is written by"),
         ("reads", "accumulated into by"))


def check_dataflow(t: Placed, cfg: ModelConfig, B: int, NS: int, NLM: int, tp: int = 1,
                   counter_name=None) -> None:
    merged = not (t.op == Op.ATTN_OPROJ).any()
    dims = buffer_dims(cfg, B, NS, NLM, tp, merged)
    sizes = np.array([int(np.prod([n for _, n in dims[b]])) for b in BUFFERS], np.int64)
    base = np.r_[0, np.cumsum(sizes)]
    copy = int(base[-1])                                   # elements of one rank's buffers
    counter_name = counter_name or (lambda c: f"counter {c}")

    def name(flat: int) -> str:
        """Buffer element at a global flat index, e.g. resid[level=3, col=17, b=0]."""
        gpu, flat = divmod(flat, copy)
        k = int(np.searchsorted(base, flat, "right") - 1)
        coords = np.unravel_index(flat - base[k], [n for _, n in dims[BUFFERS[k]]])
        inner = ", ".join(f"{d}={int(c)}" for (d, _), c in zip(dims[BUFFERS[k]], coords))
        return f"{BUFFERS[k]}[{inner}]" + (f" of rank {gpu}" if tp > 1 else "")

    def fail(i: int, msg: str):
        raise ValueError(f"invalid plan: {t.where(i)}: {msg}")

    acc = accesses(t, cfg, B, NS, NLM, tp, t.rank)
    outside = np.flatnonzero(acc.stop > sizes[acc.buf])
    if len(outside):
        k = int(outside[0])
        buf = BUFFERS[acc.buf[k]]
        fail(int(acc.inst[k]), f"accesses {buf} elements [{acc.start[k]}, {acc.stop[k]}), "
             f"outside its {sizes[acc.buf[k]]} elements" + ("" if merged else
                                                   " (a plan with ATTN_OPROJ has no attn)"))
    rank = np.zeros(len(acc.inst), np.int64) if t.rank is None else t.rank[acc.inst]
    if tp > 1:                       # a remote write: one access per destination rank
        reps = np.where(acc.remote, tp, 1)
        k = np.repeat(np.arange(len(reps)), reps)
        within = np.arange(len(k)) - np.repeat(np.cumsum(reps) - reps, reps)
        rank = np.where(acc.remote[k], within, rank[k])
        acc = type(acc)(*(getattr(acc, f.name)[k] for f in dataclasses.fields(acc)))
    offset = base[acc.buf] + rank * copy
    gstart, gstop = offset + acc.start, offset + acc.stop

    w = np.flatnonzero(acc.write & ~acc.add)
    w = w[np.argsort(gstart[w], kind="stable")]
    ws, we, wi = gstart[w], gstop[w], acc.inst[w]
    overlap = np.flatnonzero(ws[1:] < we[:-1])
    if len(overlap):
        k = int(overlap[0])
        fail(int(wi[k + 1]), f"writes {name(int(ws[k + 1]))}, also written by "
             f"{t.where(int(wi[k]))}: every element must have one writer per step")

    r = np.flatnonzero(~acc.write | acc.add)       # an accumulation reads its initial value
    rs, re, ri, kind = gstart[r], gstop[r], acc.inst[r], acc.add[r].astype(np.int64)
    i0 = np.searchsorted(we, rs, "right")                 # first write ending after rs
    i1 = np.searchsorted(ws, re, "left")                  # writes starting before re: [0, i1)
    breaks = np.r_[0, np.cumsum(we[:-1] != ws[1:])]
    last = np.maximum(i1 - 1, 0)
    covered = (i0 < i1) & (ws[np.minimum(i0, len(ws) - 1)] <= rs) & (we[last] >= re) \
        & (breaks[last] == breaks[np.minimum(i0, last)])
    for k in np.flatnonzero(~covered)[:1]:
        written = np.zeros(int(re[k] - rs[k]), bool)
        for j in range(i0[k], i1[k]):
            written[max(ws[j], rs[k]) - rs[k]:min(we[j], re[k]) - rs[k]] = True
        fail(int(ri[k]), f"{READS[kind[k]][0]} {name(int(rs[k] + np.argmin(written)))}, "
             "which no instruction writes" + (" (the initial value of its adds)" * kind[k]))

    gaps = np.flatnonzero(np.r_[ws[0] != 0, ws[1:] != we[:-1], we[-1] != tp * copy])
    if len(gaps):
        k = int(gaps[0])
        missing = 0 if k == 0 else int(we[k - 1])
        raise ValueError(f"invalid plan: {name(missing)} is never written: every element of "
                         "every step buffer must be written exactly once")

    reads = [rs, re, ri, i0, i1, kind]
    a = np.flatnonzero(acc.add)
    if len(a):
        later, As, Ai = _after_accumulations(t, a, acc, gstart, gstop, len(ws), name, fail)
        reads = [np.r_[x, y] for x, y in zip(reads, later)]
        ws, wi = np.r_[ws, As], np.r_[wi, Ai]
    _check_ordered(t, *reads, ws, wi, name, counter_name, flagged_readers(t, tp))


def _after_accumulations(t: Placed, a, acc, gstart, gstop, first: int, name, fail):
    """The ordinary reads of accumulated elements, each against every accumulation of its
    range: (reads as check_dataflow's [rs, re, ri, i0, i1, kind = 2], the accumulations'
    starts, their instructions); i0, i1 count from `first`, where they join the writes.
    Inside one stage (layer, opcode) accumulations cover identical or disjoint ranges (a
    partial overlap there is a slice added twice); different stages' may overlap anyhow
    (DOWN row slices and the next ATTN_OPROJ's column slices into one level)."""
    def stage(i):
        return t.layer[i].astype(np.int64) * 64 + t.op[i]
    a = a[np.lexsort((gstop[a], gstart[a], stage(acc.inst[a])))]
    As, Ae, Ai = gstart[a], gstop[a], acc.inst[a]
    st = stage(Ai)
    bad = np.flatnonzero((st[1:] == st[:-1]) & (As[1:] < Ae[:-1])
                         & ((As[1:] != As[:-1]) | (Ae[1:] != Ae[:-1])))
    if len(bad):
        k = int(bad[0])
        fail(int(Ai[k + 1]), f"accumulates into {name(int(As[k + 1]))} .. "
             f"{name(int(Ae[k + 1] - 1))}, a range overlapping that of {t.where(int(Ai[k]))} "
             "but not equal to it: one stage's accumulations must cover identical or disjoint "
             "ranges")
    # Cut every accumulation at every accumulation's ends: the pieces are then identical or
    # disjoint, and sorted by start their ends are sorted too.
    bounds = np.unique(np.r_[As, Ae])
    b0, b1 = np.searchsorted(bounds, As), np.searchsorted(bounds, Ae)
    k = np.repeat(np.arange(len(As)), b1 - b0)
    j = b0[k] + np.arange(len(k)) - np.repeat(np.cumsum(b1 - b0) - (b1 - b0), b1 - b0)
    order = np.lexsort((bounds[j + 1], bounds[j]))
    Ps, Pe, Pi = bounds[j][order], bounds[j + 1][order], Ai[k][order]
    r = np.flatnonzero(~acc.write)
    rs, re, ri = gstart[r], gstop[r], acc.inst[r]
    j0 = np.searchsorted(Pe, rs, "right")
    j1 = np.searchsorted(Ps, re, "left")
    m = j1 > j0
    return ([rs[m], re[m], ri[m], j0[m] + first, j1[m] + first, np.full(int(m.sum()), 2)],
            Ps, Pi)


def _check_ordered(t: Placed, rs, re, ri, i0, i1, kind, ws, wi, name, counter_name,
                   shallow) -> None:
    """Every write [i0, i1) (starts ws, writers wi) of every read (rs, re, reader ri, kind
    an index into READS) happens-before the reader."""
    w = t.waits[ri].astype(np.int64)
    keys = [w[:, 0] << 32 | w[:, 1], w[:, 2] << 32 | w[:, 3], shallow[ri], rs, re, kind]
    by_key = np.lexsort(keys[::-1])
    new = np.zeros(len(by_key), bool)
    new[0] = True
    for k in keys:
        new[1:] |= k[by_key][1:] != k[by_key][:-1]
    first = by_key[new]                                    # one read per distinct key
    counts = i1[first] - i0[first]
    key_of = np.repeat(np.arange(len(first)), counts)
    offsets = np.cumsum(counts) - counts
    write = i0[first][key_of] + np.arange(counts.sum()) - offsets[key_of]
    writer, reader = wi[write], ri[first][key_of]
    tracked = np.zeros(len(t), bool)
    tracked[writer] = True
    sig_of, sets, position = happens.ancestor_sets(t.waits, t.signal, tracked, shallow)
    prefix = np.array([happens.prefix(s) for s in sets], np.int64)
    wpos = position[writer]
    maybe = np.flatnonzero(wpos >= prefix[sig_of[reader]])
    bad = maybe[~happens.contains_many(sets, sig_of[reader[maybe]], wpos[maybe])]
    if bad.size:                                           # the first, as a loop would
        k = int(bad[0])
        u, v = int(writer[k]), int(reader[k])
        read = first[key_of[k]]
        elem = name(int(max(ws[write[k]], rs[read])))
        raise ValueError(
            f"invalid plan: {t.where(v)}: {READS[kind[read]][0]} {elem}, "
            f"{READS[kind[read]][1]} {t.where(u)}, "
            f"which does not happen before it: no chain of counter waits leads from "
            f"{counter_name(int(t.signal[u]))} (the writer's signal) to this instruction's "
            f"waits "
            f"{t.wait_ranges(v)}")
