"""One validator table for all ranks of a tensor-parallel program.

The rank tables are concatenated with a rank column, and counters get global ids: counter
c of rank r is r*C + c, and a counter signalled with all_ranks (one per rank, every copy
bumped by every rank's signalers: isa.py) is the single node tp*C + c. With those ids every
instruction signals one counter and a cross-rank edge (a peer store, then an all-rank
signal, then a wait on that counter on any rank) is an ordinary counter edge, so the
single-GPU checks (counters, order, happens-before) apply to the merged table unchanged.
"""
from __future__ import annotations

import numpy as np

from .table import Placed


def counter_namer(tp: int, C: int):
    def name(g: int) -> str:
        g = int(g)
        if tp == 1:
            return f"counter {g}"
        if g >= tp * C:
            return f"all-rank counter {g - tp * C}"
        return f"counter {g % C} of rank {g // C}"
    return name


def merge(programs, tables: list[Placed]) -> tuple[Placed, np.ndarray]:
    """(merged table with global counter ids, targets int64 [(tp + 1) * C])."""
    tp, C = len(programs), len(programs[0].counter_targets)
    for p in programs:
        if len(p.counter_targets) != C:
            raise ValueError(f"invalid plan: rank {p.rank} has {len(p.counter_targets)} "
                             f"counters, rank 0 has {C}: every rank needs the same counters")
    rank = np.concatenate([np.full(len(t), r, np.int32) for r, t in enumerate(tables)])
    cols = {f: np.concatenate([getattr(t, f) for t in tables]) for f in
            ("op", "layer", "args", "waits", "signal", "all_ranks", "uid", "sm", "index")}
    t = Placed(**cols, rank=rank)
    sig, rem = t.signal, t.all_ranks != 0
    shared = np.zeros(C, bool)
    shared[sig[rem & (sig >= 0)]] = True
    mixed = np.flatnonzero(~rem & (sig >= 0) & shared[np.maximum(sig, 0)])
    if len(mixed):
        i = int(mixed[0])
        raise ValueError(f"invalid plan: {t.where(i)}: signals counter {int(sig[i])} rank-"
                         "locally, other instructions signal it on all ranks")
    local = rank.astype(np.int64) * C
    t.signal = np.where(sig < 0, -1, np.where(rem, tp * C + sig, local + sig)).astype(np.int32)
    first, count = t.waits[:, 0::2].astype(np.int64), t.waits[:, 1::2].astype(np.int64)
    prefix = np.r_[0, np.cumsum(shared)]
    n_shared = prefix[np.clip(first + count, 0, C)] - prefix[np.clip(first, 0, C)]
    all_shared = n_shared == count
    bad = (count > 0) & ~all_shared & (n_shared > 0)
    for i, k in np.argwhere(bad)[:1]:
        raise ValueError(f"invalid plan: {t.where(int(i))}: wait range {t.wait_ranges(i)[k]} "
                         "mixes all-rank and rank-local counters")
    waits = t.waits.copy()
    waits[:, 0::2] = np.where(count == 0, 0, np.where(all_shared, tp * C + first,
                                                      local[:, None] + first))
    t.waits = waits
    targets = np.zeros((tp + 1) * C, np.int64)
    for p in programs:
        mine = np.asarray(p.counter_targets, np.int64)
        targets[p.rank * C:(p.rank + 1) * C] = np.where(shared, 0, mine)
        differs = np.flatnonzero(shared & (mine != programs[0].counter_targets))
        if len(differs):
            c = int(differs[0])
            raise ValueError(f"invalid plan: all-rank counter {c}: rank {p.rank}'s target "
                             f"{int(mine[c])} differs from rank 0's "
                             f"{int(programs[0].counter_targets[c])}")
    targets[tp * C:] = np.where(shared, programs[0].counter_targets, 0)
    return t, targets
