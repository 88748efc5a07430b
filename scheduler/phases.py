"""A tensor-parallel Program cut into phases: the NCCL-between-launches ablation.

Issue 7's ablation replaces the kernel's in-kernel communication (peer stores + all-rank
signals) with NCCL collectives between megakernel launches. Each rank's Program is cut at
every point where it needs another rank's data, giving 2L + 2 phases per step:

    phase 2l     layer l up to its O-proj partials (phase 0 starts with EMBED; for l > 0
                 it starts with the MLP RESID_SUM of layer l-1)
    phase 2l+1   layer l's attention RESID_SUM, GATEUP, and the down-proj partials
    phase 2L     LMHEAD
    phase 2L+1   ARGMAX
and between phase p and p+1 one collective (`collective_after`): all-gather of
part[p] over the ranks (p < 2L), or a sum of the logits and LM-head argmax partials (p == 2L,
every rank's non-owned entries are zero, so the sum is exact).

In a phase Program all_ranks stores and signals stay on the rank (the kernel's
MODE_LOCAL_COMM), so an all-rank counter's target becomes the number of this rank's own
signalers. Each SM queue keeps its order restricted to the phase: a phase is closed under
dependencies (checked), so the restricted queues cannot deadlock. Only the last phase's
launch counts the step (done, epoch).
"""
from __future__ import annotations

import dataclasses

import numpy as np

from . import isa
from .isa import Op

_W = {name: i for i, name in enumerate(isa.HEADER)}
_AFTER_MLP = isa.word_index(Op.RESID_SUM, "after_mlp")


def num_phases(L: int) -> int:
    return 2 * L + 2


def collective_after(p: int, L: int) -> tuple[str, int] | None:
    """What moves between phase p and p+1: ("gather_part", level), ("sum_logits", -1) or
    None after the last phase."""
    if p < 2 * L:
        return ("gather_part", p)
    if p == 2 * L:
        return ("sum_logits", -1)
    return None


def phase_of(rec: np.ndarray, L: int) -> int:
    """Phase of one int32 record (module docstring)."""
    op, layer = Op(int(rec[_W["opcode"]])), int(rec[_W["layer"]])
    if op == Op.EMBED:
        return 0
    if op in (Op.QKV, Op.ATTN, Op.ATTN_REDUCE, Op.OPROJ, Op.ATTN_OPROJ):
        return 2 * layer
    if op in (Op.GATEUP, Op.DOWN):
        return 2 * layer + 1
    if op == Op.RESID_SUM:
        return 2 * layer + 1 + int(rec[_AFTER_MLP])
    if op == Op.LMHEAD:
        return 2 * L
    if op == Op.ARGMAX:
        return 2 * L + 1
    raise ValueError(f"no phase for opcode {op.name}")


def split_phases(program) -> list[list]:
    """TpProgram -> [rank][phase] Programs (module docstring). ValueError if an instruction
    waits on a later phase, or on an all-rank counter signalled in its own phase."""
    if getattr(program, "tp", 1) < 2:
        raise ValueError("split_phases needs a tensor-parallel program (tp > 1)")
    L = program.config.L
    return [_split_rank(p, L) for p in program.ranks]


def _split_rank(p, L: int) -> list:
    C, S = int(p.num_counters), int(p.num_sms)
    recs = [(sm, i, p.instructions[sm, i]) for sm in range(S) for i in range(int(p.queue_len[sm]))]
    phase = {(sm, i): phase_of(r, L) for sm, i, r in recs}
    shared = np.zeros(C, bool)
    local = np.zeros(C, np.int64)        # this rank's signalers per counter
    signal_phase = np.full(C, -1)
    for sm, i, r in recs:
        c = int(r[_W["signal"]])
        if c >= 0:
            local[c] += 1
            shared[c] |= bool(r[isa.ALL_RANKS_WORD])
            signal_phase[c] = max(signal_phase[c], phase[sm, i])
    for sm, i, r in recs:
        for k in range(isa.NUM_WAITS):
            first, count = int(r[3 + 2 * k]), int(r[4 + 2 * k])
            for c in range(first, first + count):
                late = signal_phase[c] > phase[sm, i] or (shared[c] and
                                                           signal_phase[c] == phase[sm, i])
                if late:
                    raise ValueError(
                        f"cannot split rank {p.rank}: SM {sm} index {i} (uid "
                        f"{int(r[_W['uid']])}, {Op(int(r[0])).name}, phase {phase[sm, i]}) waits on "
                        f"counter {c}, signalled in phase {int(signal_phase[c])}")
    targets = np.where(shared, local, p.counter_targets).astype(np.int32)
    out = []
    for ph in range(num_phases(L)):
        queues = [[p.instructions[sm, i] for i in range(int(p.queue_len[sm]))
                   if phase[sm, i] == ph] for sm in range(S)]
        width = max(1, max(len(q) for q in queues))
        ins = np.zeros((S, width, isa.WORDS), np.int32)
        for sm, q in enumerate(queues):
            if q:
                ins[sm, :len(q)] = np.stack(q)
        out.append(dataclasses.replace(
            p, instructions=ins, queue_len=np.array([len(q) for q in queues], np.int32),
            counter_targets=targets, num_instructions=sum(len(q) for q in queues)))
    return out
