"""Happens-before through counters, for the validator.

u happens-before v when a chain of counter edges leads from u to v: u signals c and v waits
on a range holding c (v cannot start before u's outputs are visible), transitively. Queue
order on one SM does not count: the kernel may overlap an instruction's stores with the
next instruction on the same SM, so every dependency must go through a counter.

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


# union and add skip _normalise (a call) unless position p itself became set: the
# validator calls them ~10^6 times for a 70B tp=8 plan.
def union(a: tuple[int, int], b: tuple[int, int]) -> tuple[int, int]:
    (pa, ba), (pb, bb) = (a, b) if a[0] >= b[0] else (b, a)
    bits = ba | (bb >> (pa - pb))
    return _normalise(pa, bits) if bits & 1 else (pa, bits)


def add(a: tuple[int, int], x: int) -> tuple[int, int]:
    p, bits = a
    if x < p:
        return a
    bits |= 1 << (x - p)
    return _normalise(p, bits) if bits & 1 else (p, bits)


def contains(a: tuple[int, int], x: int) -> bool:
    p, bits = a
    return x < p or bool((bits >> (x - p)) & 1)


def contains_many(sets: list, sig: np.ndarray, x: np.ndarray) -> np.ndarray:
    """contains(sets[sig[k]], x[k]) for every k, as a bool array: one bit array per distinct
    set instead of a Python call per pair (~5 x 10^5 pairs for a 70B tp=8 plan)."""
    out = np.zeros(len(x), bool)
    order = np.argsort(sig, kind="stable")
    bounds = np.flatnonzero(np.diff(sig[order])) + 1
    for idx in np.split(order, bounds) if len(order) else []:
        p, bits = sets[int(sig[idx[0]])]
        d = x[idx] - p
        hit = d < 0
        if bits:
            raw = bits.to_bytes((bits.bit_length() + 7) // 8, "little")
            arr = np.unpackbits(np.frombuffer(raw, np.uint8), bitorder="little").astype(bool)
            inside = (d >= 0) & (d < len(arr))
            hit[inside] = arr[d[inside]]
        out[idx] = hit
    return out


def ancestor_sets(waits: np.ndarray, signal: np.ndarray, tracked: np.ndarray):
    """Ancestors of every instruction, in uid order (row index == uid, a topological order:
    every signaler of a counter precedes its waiters).
    waits int [N, 2k] (first, count) pairs; signal int [N]; tracked bool [N].
    Returns (sig_of int [N], sets, position int [N]): instruction u's ancestors are
    sets[sig_of[u]], a (p, bits) set over position[] of the tracked instructions."""
    position = np.cumsum(tracked) - 1
    pos = np.where(tracked, position, -1).tolist()
    counter_sets: dict[int, tuple[int, int]] = {}
    sig_ids: dict[tuple, int] = {}
    sets: list[tuple[int, int]] = []
    sig_of = []
    for u, (w, c) in enumerate(zip(waits.tolist(), signal.tolist())):
        key = tuple(w)
        k = sig_ids.get(key)
        if k is None:
            acc = EMPTY
            for j in range(0, len(w), 2):
                for x in range(w[j], w[j] + w[j + 1]):
                    acc = union(acc, counter_sets[x])
            k = sig_ids[key] = len(sets)
            sets.append(acc)
        sig_of.append(k)
        if c >= 0:
            mine = sets[k] if pos[u] < 0 else add(sets[k], pos[u])
            counter_sets[c] = union(counter_sets.get(c, EMPTY), mine)
    return np.asarray(sig_of), sets, position
