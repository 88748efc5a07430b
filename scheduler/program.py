"""Program: a planned decode step, exactly what the CPU interpreter and the CUDA runtime read.

Invariants (validate() proves them for every plan): instructions[sm, :queue_len[sm]] is SM
sm's queue in execution order and every word after it is 0 (NOP); uids are 0..N-1, the
index of each instruction in one global topological order, and every queue is sorted by
uid; counter_targets[c] is the number of instructions that signal c; LMHEAD slots are
0..lm_slices-1. Counters are monotonic across steps (see isa.py), never reset per step.

Under tensor parallelism plan() returns a TpProgram: one Program per rank (config = the
shard config, rank = its index), each exactly what that GPU runs, with the same counters
and uid numbering on every rank; counter_targets count the signals of all ranks (isa.py).
"""
from __future__ import annotations

import dataclasses
from collections import Counter

import numpy as np

from megakernel.config import ModelConfig

from . import isa
from .cost import GpuSpec
from .table import Placed, placed_from


@dataclasses.dataclass
class Program:
    config: ModelConfig
    batch: int
    num_sms: int
    tp: int
    policy: str
    granularity: str
    attn_splits: int              # NS: KV splits per (b, kv_head)
    lm_slices: int                # NLM: number of LMHEAD instructions
    instructions: np.ndarray      # int32 [num_sms, max_len, WORDS]
    queue_len: np.ndarray         # int32 [num_sms]
    counter_targets: np.ndarray   # int32 [num_counters]
    num_counters: int
    num_instructions: int
    options: dict                 # every plan option, defaults filled in
    predicted_us: float           # cost-model prediction of one step on `gpu`
    gpu: GpuSpec
    rank: int = 0

    @property
    def max_len(self) -> int:
        return int(self.instructions.shape[1])

    def table(self) -> Placed:
        """Every queued instruction as numpy columns, in (SM, queue index) order."""
        return placed_from(self.instructions, self.queue_len)

    def records(self):
        """Yield (sm, index, decoded record dict) for every queued instruction."""
        for sm in range(self.num_sms):
            for index in range(int(self.queue_len[sm])):
                yield sm, index, isa.decode(self.instructions[sm, index])

    def summary(self) -> str:
        cfg, t = self.config, self.table()
        ops = Counter(isa.Op(int(o)).name for o in t.op)
        q = self.queue_len
        targets = Counter(int(x) for x in self.counter_targets)
        lines = [
            f"program: {cfg.name}  batch {self.batch}  tp {self.tp}  {self.num_sms} SMs  "
            f"policy {self.policy}  granularity {self.granularity}",
            f"  attn_splits {self.attn_splits}  lm_slices {self.lm_slices}  "
            f"instructions {self.num_instructions}  counters {self.num_counters}",
            "  per opcode: " + ", ".join(f"{name} {ops[name]}" for name in
                                         (op.name for op in isa.Op) if ops[name]),
            f"  queue length per SM: min {q.min()}  mean {q.mean():.1f}  max {q.max()}",
            "  counter targets: " + ", ".join(f"{n} x {k}" for k, n in sorted(targets.items())),
            f"  predicted step on {self.gpu.name}: {self.predicted_us:.1f} us",
        ]
        return "\n".join(lines)


@dataclasses.dataclass
class TpProgram:
    config: ModelConfig           # the whole model; ranks[r].config is the shard config
    tp: int
    ranks: list                   # [tp] Program, ranks[r].rank == r

    def __getattr__(self, name):
        """Fields every rank shares (batch, num_sms, policy, attn_splits, lm_slices, ...)."""
        if name == "ranks":
            raise AttributeError(name)
        return getattr(self.ranks[0], name)

    @property
    def predicted_us(self) -> float:
        return max(p.predicted_us for p in self.ranks)

    def summary(self) -> str:
        return "\n".join([f"tp {self.tp} program of {self.config.name}: rank 0 shown"] +
                          [self.ranks[0].summary()])
