"""SM assignment policies: a global topological order of the lowered instructions plus an SM
for each. Every policy returns (order, sm): order[k] = lowering index of the k-th instruction
(its uid will be k), sm[i] = SM of lowering index i. Each SM's queue is its instructions in
`order`, so every queue is a subsequence of one topological order (deadlock freedom).
Instructions plan() makes claimed (policy queue, option claim_tail) ignore their SM and
run in `order` from Program.claim, whichever SM is free first taking the next.

    rr     round-robin over the lowering order
    lpt    stage by stage (a wave), longest predicted instruction first onto the SM least
           loaded in this wave, ties to the least loaded overall; blind to ready times
    dag    list scheduling: among instructions whose producers are all placed, take the one
           with the longest predicted path to the end; put it on the SM that can start it
           earliest (best fit: of the SMs idle by its ready time, the one idle latest)
    queue  a global work queue: dag's order, every instruction claimed at run time (plan()
           puts them all in Program.claim; the static queues stay empty), so the SM that is
           free first takes the next, whatever SM dag predicted
Dependencies are tracked per distinct wait range (a "range node"), not per instruction
pair, so the work is linear in instructions + counters.
"""
from __future__ import annotations

import bisect
import heapq

import numpy as np

from .lowering import Lowered

POLICIES = ("rr", "lpt", "dag", "queue")


def assign(low: Lowered, cost_us: np.ndarray, policy: str, num_sms: int,
           counter_latency_us: float) -> tuple[np.ndarray, np.ndarray]:
    if policy == "rr":
        order = np.arange(len(cost_us))
        return order, (order % num_sms).astype(np.int32)
    if policy == "lpt":
        return _lpt(low, cost_us, num_sms)
    return _dag(low, cost_us, num_sms, counter_latency_us)     # dag, and queue's order


def _lpt(low: Lowered, cost: np.ndarray, num_sms: int):
    order = np.lexsort((np.arange(len(cost)), -cost, low.stage))
    sm = np.empty(len(cost), np.int32)
    total = [0.0] * num_sms
    stage = -1
    for i, c, st in zip(order.tolist(), cost[order].tolist(), low.stage[order].tolist()):
        if st != stage:          # a new wave: balance it alone, ties to the least total load
            stage, loads = st, [(0.0, total[s], s) for s in range(num_sms)]
            heapq.heapify(loads)
        load, _, s = heapq.heappop(loads)
        sm[i] = s
        total[s] += c
        heapq.heappush(loads, (load + c, total[s], s))
    return order, sm


class _Graph:
    """Counter dependencies of the lowered instructions, grouped by distinct wait range."""

    def __init__(self, low: Lowered):
        ins = low.instrs
        self.signal = ins.signal.tolist()
        ids: dict[tuple[int, int], int] = {}
        self.ranges: list[tuple[int, int]] = []
        self.inst_ranges: list[list[int]] = []       # per instruction: its range nodes
        self.waiters: list[list[int]] = []           # per range node: instructions
        for i in range(len(ins)):
            mine = []
            for rng in ins.wait_ranges(i):
                r = ids.get(rng)
                if r is None:
                    r = ids[rng] = len(self.ranges)
                    self.ranges.append(rng)
                    self.waiters.append([])
                if r not in mine:
                    mine.append(r)
                    self.waiters[r].append(i)
            self.inst_ranges.append(mine)
        self.ranges_of: list[list[int]] = [[] for _ in range(len(low.counter_targets))]
        for r, (first, count) in enumerate(self.ranges):
            for c in range(first, first + count):
                self.ranges_of[c].append(r)

    def bottom_levels(self, cost: list[float], latency: float) -> list[float]:
        """Longest predicted path from each instruction's start to the end of the step."""
        level = [0.0] * len(cost)
        range_level = [0.0] * len(self.ranges)
        for i in reversed(range(len(cost))):
            s = self.signal[i]
            tail = max((range_level[r] + latency for r in self.ranges_of[s]), default=0.0) \
                if s >= 0 else 0.0
            level[i] = cost[i] + tail
            for r in self.inst_ranges[i]:
                range_level[r] = max(range_level[r], level[i])
        return level


def _dag(low: Lowered, cost_arr: np.ndarray, num_sms: int, latency: float):
    g = _Graph(low)
    cost = cost_arr.tolist()
    level = g.bottom_levels(cost, latency)
    signal = low.instrs.signal        # this rank's own signalers (all-rank counters count more)
    counter_left = np.bincount(signal[signal >= 0], minlength=len(low.counter_targets)).tolist()
    counter_done = [0.0] * len(counter_left)
    range_left = [count for _, count in g.ranges]
    range_ready = [0.0] * len(g.ranges)
    inst_left = [len(r) for r in g.inst_ranges]
    ready = [(-level[i], i) for i, n in enumerate(inst_left) if n == 0]
    heapq.heapify(ready)
    free = [(0.0, s) for s in range(num_sms)]          # sorted (time the SM is free, sm)
    order, sm = [], np.empty(len(cost), np.int32)
    while ready:
        _, i = heapq.heappop(ready)
        t_ready = max((range_ready[r] for r in g.inst_ranges[i]), default=0.0)
        k = bisect.bisect_right(free, (t_ready, num_sms))
        k = k - 1 if k else 0
        t_free, s = free.pop(k)
        end = max(t_free, t_ready) + cost[i]
        bisect.insort(free, (end, s))
        sm[i] = s
        order.append(i)
        c = g.signal[i]
        if c < 0:
            continue
        counter_done[c] = max(counter_done[c], end)
        counter_left[c] -= 1
        if counter_left[c]:
            continue
        for r in g.ranges_of[c]:
            range_ready[r] = max(range_ready[r], counter_done[c] + latency)
            range_left[r] -= 1
            if range_left[r]:
                continue
            for w in g.waiters[r]:
                inst_left[w] -= 1
                if not inst_left[w]:
                    heapq.heappush(ready, (-level[w], w))
    if len(order) != len(cost):
        raise RuntimeError(f"dag policy placed {len(order)} of {len(cost)} instructions: the "
                           "lowered graph has a cycle or a counter without signalers")
    return np.asarray(order), sm
