"""Program: a planned decode step, exactly what the CPU interpreter and the CUDA runtime read.

Invariants (validate() proves them for every plan): instructions[sm, :queue_len[sm]] is SM
sm's queue in execution order and every word after it is 0 (NOP); claim[k] is the k-th
record the SMs claim at run time (a global work queue: policy "queue", plan option
claim_tail); uids are 0..N-1 over both, the index of each instruction in one global
topological order, every queue is sorted by uid, and claim[k] has uid num_static + k
(num_static = queue_len.sum()), so every claimed uid follows every static one;
counter_targets[c] is the number of instructions that signal c; LMHEAD slots are
0..lm_slices-1. Counters are monotonic across steps (see isa.py), never reset per step.

Each SM runs its whole static queue, then repeatedly claims the next unclaimed record of
`claim` (an atomic add on a shared index) and runs it, until the list runs dry. Claims are
taken in uid order and static instructions never wait on claimed ones, so the unfinished
instruction with the smallest uid can always run: claiming cannot deadlock. Claims need
tp = 1.

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
from .table import CLAIMED, Placed, placed_from


def no_claims() -> np.ndarray:
    """An empty claim list: int32 [0, WORDS]."""
    return np.zeros((0, isa.WORDS), np.int32)


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
    claim: np.ndarray = dataclasses.field(default_factory=no_claims)   # int32 [claim_len, WORDS]

    @property
    def max_len(self) -> int:
        return int(self.instructions.shape[1])

    @property
    def claim_len(self) -> int:
        return len(self.claim)

    def table(self) -> Placed:
        """Every instruction as numpy columns: the queued ones in (SM, queue index) order,
        then the claimed ones in claim order (sm table.CLAIMED, index the claim index)."""
        return placed_from(self.instructions, self.queue_len, self.claim)

    def records(self):
        """Yield (sm, index, decoded record dict) for every instruction, in table() order
        (a claimed record: sm table.CLAIMED, index its claim index)."""
        for sm in range(self.num_sms):
            for index in range(int(self.queue_len[sm])):
                yield sm, index, isa.decode(self.instructions[sm, index])
        for index, rec in enumerate(self.claim):
            yield CLAIMED, index, isa.decode(rec)

    def require_static(self, what: str) -> None:
        """Raise ValueError where this program claims records at run time: `what` reads
        per-SM arrays by (SM, queue index), as the kernel's timing stamps are laid out, so it
        needs the queues each SM ran: as_executed(claimed)."""
        if self.claim_len:
            raise ValueError(f"{what} needs each SM's queue, and this program has "
                             f"{self.claim_len} records the SMs claim at run time: pass "
                             "program.as_executed(claimed), claimed being the step's record "
                             "of which SM took which claim")

    def as_executed(self, claimed) -> "Program":
        """The Program without claims whose queues are what each SM ran in one step: its
        static queue, then the claimed records it took, in claim order; same records and
        uids. claimed: int [num_sms, claim_len], row s the claim indices SM s took, in
        order, then -1 (the kernel's record of the claims, CpuInterpreter.claimed). An SM
        takes claims in increasing order and every claim is taken once (ValueError if not).
        Its (SM, queue index) is where one step's per-instruction timing stamps sit, so the
        trace tools (calibration.measure, bench/trace.py) read a claimed step through it."""
        claimed = np.asarray(claimed)
        n, S = self.claim_len, self.num_sms
        if claimed.shape != (S, n) or not np.issubdtype(claimed.dtype, np.integer):
            raise ValueError(f"claimed must be integers [num_sms={S}, claim_len={n}], got "
                             f"{claimed.dtype} {claimed.shape}")
        padded = np.c_[np.full(S, -2), claimed]           # -2: before a row's first claim
        prev = padded[:, :-1]
        bad = np.argwhere((claimed < -1) | (claimed >= n)
                          | ((claimed >= 0) & ((prev == -1) | (claimed <= prev))))
        if len(bad):
            s, j = bad[0]
            raise ValueError(f"claimed[{s}, {j}] = {claimed[s, j]}: each row must be claim "
                             f"indices in 0..{n - 1}, increasing (an SM claims in claim "
                             "order), then -1")
        taken = claimed >= 0
        if not np.array_equal(np.sort(claimed[taken]), np.arange(n)):
            raise ValueError(f"claimed must hold every claim index 0..{n - 1} exactly once "
                             "(one SM takes each claim)")
        queue_len = (self.queue_len + taken.sum(axis=1)).astype(np.int32)
        instructions = np.zeros((S, max(1, int(queue_len.max())), isa.WORDS), np.int32)
        m = int(self.queue_len.max(initial=0))
        instructions[:, :m] = self.instructions[:, :m]
        sm, j = np.nonzero(taken)
        instructions[sm, self.queue_len[sm] + j] = self.claim[claimed[sm, j]]
        return dataclasses.replace(self, instructions=instructions, queue_len=queue_len,
                                   claim=no_claims())

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
            f"  queue length per SM: min {q.min()}  mean {q.mean():.1f}  max {q.max()}  "
            f"claim list {self.claim_len}",
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
