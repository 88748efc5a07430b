"""Timeline simulator: replays a Program under the cost model.

Each SM runs its queue in order. An instruction starts when its SM is free and every
counter it waits on is complete (all signalers ended) plus counter_latency_us; it then
runs for its predicted time (cost.instruction_us). Then each record of the claim list
(Program.claim), in claim order, goes to the SM that is free earliest (ties: the lowest
SM index), as the SM that finishes first claims next at run time, and starts by the same
rule: the predicted timeline of the queue policy and of claim_tail. Instructions are
visited in uid order, which the validator guarantees is a topological order consistent
with every queue and with the claim order (claimed uids follow every static one), so one
pass suffices. The dag policy places instructions with this same rule, so its schedule
and this replay agree exactly.
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np

from . import isa
from .cost import GpuSpec, instruction_us
from .table import CLAIMED


@dataclasses.dataclass
class Timeline:
    gpu: str
    num_sms: int
    uid: np.ndarray       # int32 [N], increasing (index == uid)
    sm: np.ndarray        # int32 [N] (a claimed record: the SM predicted to claim it)
    op: np.ndarray        # int32 [N]
    layer: np.ndarray     # int32 [N]
    start_us: np.ndarray  # float64 [N]
    end_us: np.ndarray    # float64 [N]

    @property
    def total_us(self) -> float:
        return float(self.end_us.max(initial=0.0))

    def busy_us(self) -> np.ndarray:
        """float64 [num_sms] time each SM spends executing."""
        return np.bincount(self.sm, self.end_us - self.start_us, minlength=self.num_sms)

    def to_chrome_trace(self, path) -> Path:
        """Write Chrome/Perfetto trace JSON: one track (tid) per SM, times in us."""
        events = [{"ph": "M", "name": "process_name", "pid": 0,
                   "args": {"name": f"megakernel step (predicted, {self.gpu})"}}]
        events += [{"ph": "M", "name": "thread_name", "pid": 0, "tid": s,
                    "args": {"name": f"SM {s}"}} for s in range(self.num_sms)]
        names = {int(op): op.name for op in isa.Op}
        for u, s, o, layer, t0, t1 in zip(self.uid.tolist(), self.sm.tolist(), self.op.tolist(),
                                          self.layer.tolist(), self.start_us.tolist(),
                                          self.end_us.tolist()):
            events.append({"ph": "X", "name": names[o], "pid": 0, "tid": s, "ts": round(t0, 3),
                           "dur": round(t1 - t0, 3), "args": {"uid": u, "layer": layer}})
        path = Path(path)
        path.write_text(json.dumps({"traceEvents": events, "displayTimeUnit": "ns"}))
        return path


def wait_ready(done: np.ndarray, waits: list, lat: float, lag=None) -> float:
    """When an instruction's waits hold: the last end (`done`, per counter) over its wait
    ranges (first, count, first, count, ...) plus the counter latency, plus lag(first, count)
    where given (the ring model's last-signaller lag); 0 with none."""
    ready = 0.0
    for k in range(0, len(waits), 2):
        first, count = waits[k], waits[k + 1]
        if count:
            ready = max(ready, float(done[first:first + count].max()) + lat
                        + (lag(first, count) if lag else 0.0))
    return ready


def simulate(program, spec=None) -> Timeline:
    """Predicted timeline of one step of `program` (a validated Program) on `spec`
    (a GpuSpec, preset name, dict or JSON path; default the program's own gpu)."""
    spec = program.gpu if spec is None else GpuSpec.load(spec)
    t = program.table()
    t = t.take(np.argsort(t.uid, kind="stable"))
    cost = instruction_us(t, program.config, program.batch, program.attn_splits,
                          program.lm_slices, spec, program.num_sms,
                          program.options["kv_position"], program.tp)
    done = np.zeros(program.num_counters)
    sm_free = np.zeros(program.num_sms)
    start = np.empty(len(t))
    end = np.empty(len(t))
    lat = spec.counter_latency_us
    sms = t.sm.copy()
    waits, signal = t.waits.tolist(), t.signal.tolist()
    for i, (w, c, s) in enumerate(zip(waits, signal, t.sm.tolist())):
        if s == CLAIMED:
            s = sms[i] = int(np.argmin(sm_free))       # the first SM free, lowest on ties
        start[i] = max(wait_ready(done, w, lat), sm_free[s])
        end[i] = sm_free[s] = start[i] + cost[i]
        if c >= 0:
            done[c] = max(done[c], end[i])
    return Timeline(spec.name, program.num_sms, t.uid, sms, t.op, t.layer, start, end)
