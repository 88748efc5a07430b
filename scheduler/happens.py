"""Happens-before through counters, for the validator.

u happens-before v when a chain of counter edges leads from u to v: u signals c and v waits
on a range holding c (v cannot start before u's outputs are visible), transitively. Queue
order on one SM does not count: the kernel may overlap an instruction's stores with the
next instruction on the same SM, so every dependency must go through a counter.

A `shallow` waiter's edges carry only its signalers themselves, not their ancestors: the
flagged hops (isa.py q_ll), where a build's ATTN polls QKV's flagged pairs instead of
acquiring its counters. The poll sees the data, but a relaxed store observed orders
nothing else (QKV then signals without a release), so whatever the signalers themselves
waited for reaches the waiter's descendants only through another chain. Such sets have no
prefix: they are frozensets of positions (a few stages' worth), and a union with a prefix
set adds their elements to it.

Ancestor sets are computed once per counter and once per distinct wait signature (the
waits words of a record), not per instruction pair. Only the `tracked` instructions (those
whose writes someone reads) get a bit. A set is (p, bits): every tracked position < p, plus
position p + k for each set bit k. A decode step is layered, so p follows close behind and
`bits` stays about one stage wide: time and memory grow linearly with the step.
"""
from __future__ import annotations

import numpy as np

EMPTY = (0, 0)


def _normalise(p: int, bits: int) -> tuple[int, int]:
    ones = (~bits & (bits + 1)).bit_length() - 1       # trailing one bits join the prefix
    return p + ones, bits >> ones


# _union and _add (prefix sets only, what ancestor_sets calls ~10^6 times for a 70B tp=8
# plan) skip _normalise (a call) unless position p itself became set.
def _union(a: tuple[int, int], b: tuple[int, int]) -> tuple[int, int]:
    (pa, ba), (pb, bb) = (a, b) if a[0] >= b[0] else (b, a)
    bits = ba | (bb >> (pa - pb))
    return _normalise(pa, bits) if bits & 1 else (pa, bits)


def _add(a: tuple[int, int], x: int) -> tuple[int, int]:
    p, bits = a
    if x < p:
        return a
    bits |= 1 << (x - p)
    return _normalise(p, bits) if bits & 1 else (p, bits)


def union(a, b):
    """a | b of two sets: (p, bits) prefix sets or frozensets (flagged hops)."""
    if not isinstance(a, frozenset) and not isinstance(b, frozenset):
        return _union(a, b)
    if not isinstance(a, frozenset):
        a, b = b, a                                    # a the frozenset
    if isinstance(b, frozenset):
        return a | b
    return a if b == EMPTY else _with(b, a)


def add(a, x: int):
    return a | {x} if isinstance(a, frozenset) else _add(a, x)


def contains(a, x: int) -> bool:
    if isinstance(a, frozenset):
        return x in a
    p, bits = a
    return x < p or bool((bits >> (x - p)) & 1)


def prefix(a) -> int:
    """Every position below this is in the set (0 for a frozenset)."""
    return 0 if isinstance(a, frozenset) else a[0]


def contains_many(sets: list, sig: np.ndarray, x: np.ndarray) -> np.ndarray:
    """contains(sets[sig[k]], x[k]) for every k, as a bool array: one bit array per distinct
    set instead of a Python call per pair (~5 x 10^5 pairs for a 70B tp=8 plan)."""
    out = np.zeros(len(x), bool)
    order = np.argsort(sig, kind="stable")
    bounds = np.flatnonzero(np.diff(sig[order])) + 1
    for idx in np.split(order, bounds) if len(order) else []:
        s = sets[int(sig[idx[0]])]
        if isinstance(s, frozenset):
            out[idx] = np.isin(x[idx], np.fromiter(s, np.int64, len(s)))
            continue
        p, bits = s
        d = x[idx] - p
        hit = d < 0
        if bits:
            raw = bits.to_bytes((bits.bit_length() + 7) // 8, "little")
            arr = np.unpackbits(np.frombuffer(raw, np.uint8), bitorder="little").astype(bool)
            inside = (d >= 0) & (d < len(arr))
            hit[inside] = arr[d[inside]]
        out[idx] = hit
    return out


def ancestor_sets(waits: np.ndarray, signal: np.ndarray, tracked: np.ndarray,
                  shallow: np.ndarray | None = None):
    """Ancestors of every instruction, in uid order (row index == uid, a topological order:
    every signaler of a counter precedes its waiters).
    waits int [N, 2k] (first, count) pairs; signal int [N]; tracked bool [N]; shallow bool
    [N] (None: none): waiters whose edges carry their signalers alone (the module's doc).
    Returns (sig_of int [N], sets, position int [N]): instruction u's ancestors are
    sets[sig_of[u]], a (p, bits) prefix set or a frozenset over position[] of the tracked
    instructions."""
    position = np.cumsum(tracked) - 1
    pos = np.where(tracked, position, -1).tolist()
    shallow_of = [False] * len(pos) if shallow is None else shallow.tolist()
    # A counter's set: the prefix sets of its signalers' ancestry, the loose positions of
    # those whose ancestry is a frozenset, and its tracked signalers alone (what a shallow
    # waiter gets). Every signaler of a counter comes before its waiters, so the python sets
    # are complete when read.
    deep_of: dict[int, tuple[int, int]] = {}
    loose_of: dict[int, set] = {}
    direct: dict[int, set] = {}
    sig_ids: dict[tuple, int] = {}
    sets: list = []
    sig_of = []
    for u, (w, c, s) in enumerate(zip(waits.tolist(), signal.tolist(), shallow_of)):
        key = (*w, s)
        k = sig_ids.get(key)
        if k is None:
            deep, loose = EMPTY, set()
            for j in range(0, len(w), 2):
                for x in range(w[j], w[j] + w[j + 1]):
                    if s:
                        loose.update(direct.get(x, ()))
                    else:
                        deep = _union(deep, deep_of.get(x, EMPTY))
                        loose.update(loose_of.get(x, ()))
            k = sig_ids[key] = len(sets)
            sets.append(_with(deep, loose) if deep != EMPTY else frozenset(loose) if loose
                        else EMPTY)
        sig_of.append(k)
        if c >= 0:
            mine = sets[k]
            if isinstance(mine, frozenset):
                loose_of.setdefault(c, set()).update(mine)
                if pos[u] >= 0:
                    loose_of[c].add(pos[u])
            else:
                deep_of[c] = _union(deep_of.get(c, EMPTY),
                                    mine if pos[u] < 0 else _add(mine, pos[u]))
            if pos[u] >= 0:
                direct.setdefault(c, set()).add(pos[u])
    return np.asarray(sig_of), sets, position


def _with(a: tuple[int, int], xs) -> tuple[int, int]:
    """The prefix set a with the positions xs added, in one big-int operation."""
    p, bits = a
    d = np.fromiter((x - p for x in xs if x >= p), np.int64)
    if not len(d):
        return a
    arr = np.zeros(int(d.max()) + 1, bool)
    arr[d] = True
    bits |= int.from_bytes(np.packbits(arr, bitorder="little").tobytes(), "little")
    return _normalise(p, bits) if bits & 1 else (p, bits)
