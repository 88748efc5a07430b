"""Instruction tables: one numpy column per record field, the form every pass works on.

`Instrs` is a list of instructions (lowering order, or uid order); `Placed` adds where each
one sits (SM, queue index, uid); a record an SM claims at run time (Program.claim) has no SM
yet: sm CLAIMED and index its position in the claim list. Records round-trip through
`to_records` / `placed_from` word for word: args[:, k] is word len(isa.HEADER) + k, i.e. the
k-th field of isa.ARGS[op] (zero where the opcode has fewer fields).
"""
from __future__ import annotations

import dataclasses

import numpy as np

from . import isa

NUM_ARGS = max(len(a) for a in isa.ARGS.values())
_W = {name: i for i, name in enumerate(isa.HEADER)}
_ARG0 = len(isa.HEADER)
CLAIMED = -1   # Placed.sm of a claimed record (Program.claim): its SM is chosen at run time
_WAIT_WORDS = [_W[f"wait{k}_{f}"] for k in range(isa.NUM_WAITS) for f in ("first", "count")]


@dataclasses.dataclass
class Instrs:
    op: np.ndarray       # int32 [N]
    layer: np.ndarray    # int32 [N]
    args: np.ndarray     # int32 [N, NUM_ARGS]
    waits: np.ndarray    # int32 [N, 2 * NUM_WAITS]: first0, count0, first1, count1
    signal: np.ndarray   # int32 [N], -1 = none
    all_ranks: np.ndarray  # int32 [N], 1 = peer stores and an all-rank signal (tp > 1)

    def __len__(self) -> int:
        return len(self.op)

    def wait_ranges(self, i: int) -> list[tuple[int, int]]:
        """(first, count) of instruction i's non-empty wait ranges."""
        w = self.waits[i]
        return [(int(w[2 * k]), int(w[2 * k + 1])) for k in range(isa.NUM_WAITS) if w[2 * k + 1]]

    def take(self, idx: np.ndarray):
        """The rows idx (same table type)."""
        cols = (getattr(self, f.name) for f in dataclasses.fields(self))
        return type(self)(*(None if c is None else c[idx] for c in cols))

    def to_records(self, uid: np.ndarray) -> np.ndarray:
        """int32 [N, WORDS] records with the given uids."""
        rec = np.zeros((len(self), isa.WORDS), np.int32)
        rec[:, _W["opcode"]] = self.op
        rec[:, _W["layer"]] = self.layer
        rec[:, _W["uid"]] = uid
        rec[:, _WAIT_WORDS] = self.waits
        rec[:, _W["signal"]] = self.signal
        rec[:, isa.ALL_RANKS_WORD] = self.all_ranks
        rec[:, _ARG0:_ARG0 + NUM_ARGS] = self.args
        return rec


@dataclasses.dataclass
class Placed(Instrs):
    uid: np.ndarray      # int32 [N]
    sm: np.ndarray       # int32 [N], CLAIMED for a claimed record
    index: np.ndarray    # int32 [N] position in the SM's queue, or in the claim list
    rank: np.ndarray | None = None   # int32 [N] GPU of each instruction (tp > 1 tables)

    def where(self, i: int) -> str:
        """Human name of instruction i for error messages."""
        code = int(self.op[i])
        op = isa.Op(code).name if code in set(isa.Op) else f"opcode {code}"
        gpu = "" if self.rank is None else f"rank {int(self.rank[i])} "
        where = (f"at claim index {int(self.index[i])}" if self.sm[i] == CLAIMED else
                 f"on SM {int(self.sm[i])} at queue index {int(self.index[i])}")
        return f"{gpu}uid {int(self.uid[i])} {op} (layer {int(self.layer[i])}) {where}"


def placed_from(instructions: np.ndarray, queue_len: np.ndarray,
                claim: np.ndarray | None = None) -> Placed:
    """Placed table of every queued record, in (SM, queue index) order, then every claimed
    record in claim order (sm CLAIMED, index its claim index).
    instructions: int32 [num_sms, max_len, WORDS]; queue_len: int32 [num_sms]; claim: int32
    [claim_len, WORDS] or None (none)."""
    S, M, _ = instructions.shape
    live = np.arange(M)[None, :] < np.asarray(queue_len)[:, None]          # [S, M]
    sm, index = np.nonzero(live)
    rec = instructions[sm, index]
    if claim is not None and len(claim):
        rec = np.concatenate([rec, claim])
        sm = np.r_[sm, np.full(len(claim), CLAIMED)]
        index = np.r_[index, np.arange(len(claim))]
    return Placed(op=rec[:, _W["opcode"]], layer=rec[:, _W["layer"]],
                  args=rec[:, _ARG0:_ARG0 + NUM_ARGS], waits=rec[:, _WAIT_WORDS],
                  signal=rec[:, _W["signal"]], all_ranks=rec[:, isa.ALL_RANKS_WORD],
                  uid=rec[:, _W["uid"]],
                  sm=sm.astype(np.int32), index=index.astype(np.int32))
