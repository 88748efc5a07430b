"""Validator, run on every plan: proves a Program safe to hand to co-resident SM blocks.

Checks, in order (the first failure raises ValueError naming the instruction as "uid U
OPCODE (layer l) on SM s at queue index k", or "... at claim index k" for a record the SMs
claim at run time (Program.claim), and the counter or buffer element):
  1 shape: [num_sms, max_len, WORDS] int32; queue_len in range; all-zero NOP padding; the
    claim list int32 [claim_len, WORDS] without NOPs; claims only under tp = 1.
  2 fields: known opcodes, layer, every opcode field in range (rows even where isa.py says,
    n * batch <= MAX_ROWS_TIMES_BATCH), waits and signal inside the counter array; ATTN_OPROJ
    (dims in whole 4-dim vectors, as the kernel requires) and EMBED/OPROJ/DOWN copy = 1 only
    under tp = 1, and no copy from the last layer's DOWN (there is no resid[2L+1]); GATEUP
    copy 0-2 under tp = 1 (2 not on the last layer) with its range in the fold fields; a
    K-sliced DOWN's range in whole DOWN_K_ALIGN units, tp = 1.
  3 counters: counter_targets[c] == number of signalers of c; every waited counter has one.
    A merging ATTN's ticket (isa.py) is a counter nothing signals or waits on, taken by
    exactly the NS splits of one (layer, b, kv_head), all signalling one counter; its target
    is NS. Whichever split merges, readers of attn waiting on that counter follow it, so
    dataflow (5) books the merge's writes on split NS-1 and skips its reads of the group's
    partials (ordered by the ticket's acq_rel add, not by counters).
  4 order: uids are 0..N-1 over the queues and the claim list, claim[k] has uid
    num_static + k (num_static = queue_len.sum(): claimed uids follow every static uid, in
    claim order), each queue is sorted by uid, and every signaler of a waited counter has a
    smaller uid than the waiter. uid order is then one global topological order that every
    queue and the claim order follow, so all-resident blocks cannot deadlock: the unfinished
    instruction with the smallest uid always has all inputs complete and either heads its
    queue, or is claimed, or (every static instruction and earlier claim being done) is the
    next claim of an SM that is free to take it.
  5 dataflow (dataflow.py): buffers are SSA, every read is written, and every writer of a
    read element happens-before the reader through counters; accumulations (ATTN_OPROJ,
    K-sliced DOWN) follow the element's initial value and precede its readers. ATTN's
    waits are taken as flagged hops (a build may poll its inputs' flagged pairs instead):
    no order passes through them to its descendants.
A TpProgram is checked as one table of all its ranks (ranks.py): fields per rank (all_ranks
set exactly on OPROJ, DOWN and LMHEAD), counters with global ids (an all-rank counter's
target counts every rank's signalers), one global order (uid, rank), and dataflow over
every rank's buffers, peer stores landing in every rank's copy.
"""
from __future__ import annotations

import gc

import numpy as np

from . import isa
from .dataflow import check_dataflow
from .isa import Op
from .ranks import counter_namer, merge
from .table import CLAIMED, NUM_ARGS, Placed

REMOTE_OPS = (Op.OPROJ, Op.DOWN, Op.LMHEAD)


def validate(program) -> None:
    """Raise ValueError if `program` (a Program or TpProgram) is unsafe or wrong; return
    None if it is valid."""
    # The happens-before sets are ~10^6 short-lived ints and lists (70B tp=8) and contain no
    # cycles; collecting while they are built traverses every tracked object of the process
    # again and again (2-3x the check's time in a pytest process that has imported torch).
    enabled = gc.isenabled()
    gc.disable()
    try:
        _validate(program)
    finally:
        if enabled:
            gc.enable()


def _validate(program) -> None:
    programs = getattr(program, "ranks", None) or [program]
    tables = []
    for p in programs:
        _check_shape(p)
        if p.claim_len and (len(programs) > 1 or p.tp > 1):
            raise ValueError(f"invalid plan: rank {p.rank} has {p.claim_len} claimed records: "
                             "claims need tp = 1 (the work queue is one GPU's)")
        tables.append(p.table())
        _check_fields(p, tables[-1], len(p.counter_targets), len(programs))
    if len(programs) == 1:
        t, targets = tables[0], np.asarray(program.counter_targets)
    else:
        t, targets = merge(programs, tables)
    C, p = len(targets), programs[0]
    name = counter_namer(len(programs), len(p.counter_targets))
    ticket = _tickets(t, len(p.counter_targets))
    _check_counters(t, targets, C, name, ticket)
    _check_tickets(t, ticket, p.attn_splits, name)
    t = _check_order(t, C, name)
    check_dataflow(t, p.config, p.batch, p.attn_splits, p.lm_slices, len(programs), name)


def _fail(t: Placed, i: int, msg: str):
    raise ValueError(f"invalid plan: {t.where(i)}: {msg}")


def _first(t: Placed, bad: np.ndarray, msg):
    """Fail on the first row where bad is set; msg(i) -> text."""
    hits = np.flatnonzero(bad)
    if len(hits):
        _fail(t, int(hits[0]), msg(int(hits[0])))


def _check_shape(p) -> None:
    ins, ql = p.instructions, np.asarray(p.queue_len)
    if not isinstance(ins, np.ndarray) or ins.dtype != np.int32 or ins.ndim != 3 \
            or ins.shape[0] != p.num_sms or ins.shape[2] != isa.WORDS:
        raise ValueError(f"invalid plan: instructions must be int32 [num_sms={p.num_sms}, "
                         f"max_len, {isa.WORDS}], got {getattr(ins, 'dtype', type(ins))} "
                         f"{getattr(ins, 'shape', '')}")
    if ql.shape != (p.num_sms,) or (ql < 0).any() or (ql > ins.shape[1]).any():
        raise ValueError(f"invalid plan: queue_len must be [num_sms] in 0..{ins.shape[1]}")
    live = np.arange(ins.shape[1])[None, :] < ql[:, None]
    if (ins[live][:, 0] == Op.NOP).any():
        sm, k = np.argwhere(live & (ins[:, :, 0] == Op.NOP))[0]
        raise ValueError(f"invalid plan: SM {sm} queue index {k} is a NOP inside the queue "
                         f"(queue_len {ql[sm]}); a NOP ends the queue")
    if ins[~live].any():
        sm, k = np.argwhere(~live & ins.any(axis=2))[0]
        raise ValueError(f"invalid plan: SM {sm} queue index {k} is past queue_len {ql[sm]} "
                         "but not all-zero NOP padding")
    spare = live & ins[:, :, len(isa.HEADER) + NUM_ARGS:isa.ALL_RANKS_WORD].any(axis=2)
    if spare.any():
        sm, k = np.argwhere(spare)[0]
        raise ValueError(f"invalid plan: uid {ins[sm, k, 2]} on SM {sm} at queue index {k}: "
                         f"words past the opcode's fields must be 0")
    claim = p.claim
    if not isinstance(claim, np.ndarray) or claim.dtype != np.int32 or claim.ndim != 2 \
            or claim.shape[1] != isa.WORDS:
        raise ValueError(f"invalid plan: claim must be int32 [claim_len, {isa.WORDS}], got "
                         f"{getattr(claim, 'dtype', type(claim))} {getattr(claim, 'shape', '')}")
    if (claim[:, 0] == Op.NOP).any():
        k = int(np.flatnonzero(claim[:, 0] == Op.NOP)[0])
        raise ValueError(f"invalid plan: claim index {k} is a NOP: every claimed record is an "
                         "instruction")
    spare = claim[:, len(isa.HEADER) + NUM_ARGS:isa.ALL_RANKS_WORD].any(axis=1)
    if spare.any():
        k = int(np.flatnonzero(spare)[0])
        raise ValueError(f"invalid plan: uid {claim[k, 2]} at claim index {k}: words past the "
                         "opcode's fields must be 0")
    if p.num_instructions != int(ql.sum()) + len(claim) \
            or p.num_counters != len(p.counter_targets):
        raise ValueError(f"invalid plan: num_instructions {p.num_instructions} / num_counters "
                         f"{p.num_counters} disagree with queue_len sum {int(ql.sum())} + "
                         f"claim_len {len(claim)} / len(counter_targets) "
                         f"{len(p.counter_targets)}")


def _check_fields(p, t: Placed, C: int, tp: int) -> None:
    cfg, B = p.config, p.batch
    remote = (tp > 1) & np.isin(t.op, REMOTE_OPS)
    _first(t, t.all_ranks != remote, lambda i: (
        f"all_ranks = {t.all_ranks[i]}, must be {int(remote[i])} (1 exactly on "
        "OPROJ/DOWN/LMHEAD under tp > 1)"))
    _first(t, (t.op == Op.RESID_SUM) & ((tp == 1) | ~np.isin(t.args[:, 2], (0, 1))),
           lambda i: "RESID_SUM needs tp > 1 and after_mlp 0 or 1")
    _first(t, (t.op == Op.ATTN_OPROJ) & (tp > 1), lambda i: "ATTN_OPROJ needs tp = 1")
    copy = np.where(np.isin(t.op, [Op.EMBED, Op.OPROJ, Op.DOWN]), t.args[:, 2], 0)  # field 2
    last_down = (t.op == Op.DOWN) & (t.layer == cfg.L - 1)
    _first(t, (copy != 0) & ((copy != 1) | (tp > 1) | last_down), lambda i: (
        f"copy = {copy[i]}: 0, or 1 under tp = 1 and not on the last layer's DOWN (resid has "
        f"no level {2 * cfg.L + 1})"))
    k0, kn = (t.args[:, k].astype(np.int64) for k in (3, 4))
    u = isa.DOWN_K_ALIGN
    _first(t, (t.op == Op.DOWN) & np.where(kn == 0, k0 != 0, (tp > 1) | (k0 < 0)
                                           | (k0 + kn > cfg.I) | (k0 % u != 0) | (kn % u != 0)),
           lambda i: (f"DOWN (k0, kn) = ({k0[i]}, {kn[i]}): (0, 0) for the whole of I, or a "
                      f"K slice of whole {u}-column units inside [0, {cfg.I}), under tp = 1"))
    # The K slices of each (layer, rows) tile [0, I) once: their adds make the whole sum.
    r0, nr = t.args[:, 0].astype(np.int64), t.args[:, 1].astype(np.int64)
    ks = np.flatnonzero((t.op == Op.DOWN) & (kn > 0))
    ks = ks[np.lexsort((k0[ks], nr[ks], r0[ks], t.layer[ks]))]
    key = np.stack([t.layer[ks], r0[ks], nr[ks]], 1)
    new = np.r_[True, (key[1:] != key[:-1]).any(1)][:len(ks)]
    end = k0[ks] + kn[ks]
    bad = np.where(new, k0[ks] != 0, k0[ks] != np.r_[0, end[:-1]][:len(ks)])
    bad |= np.r_[new[1:], True][:len(ks)] & (end != cfg.I)
    _first(t, np.isin(np.arange(len(t)), ks[bad]), lambda i: (
        f"DOWN K slice [{k0[i]}, {k0[i] + kn[i]}): the K slices of rows "
        f"[{r0[i]}, {r0[i] + nr[i]}) must tile [0, {cfg.I}) once"))
    max_rows = isa.MAX_ROWS_TIMES_BATCH // B
    _first(t, ~np.isin(t.op, [int(o) for o in Op if o != Op.NOP]),
           lambda i: f"unknown opcode {int(t.op[i])}")
    no_layer = np.isin(t.op, [Op.EMBED, Op.LMHEAD, Op.ARGMAX])
    _first(t, np.where(no_layer, t.layer != -1, (t.layer < 0) | (t.layer >= cfg.L)),
           lambda i: f"layer must be -1 for EMBED/LMHEAD/ARGMAX, else in 0..{cfg.L - 1}")
    a0, a1, a2 = (t.args[:, k].astype(np.int64) for k in range(3))
    rows = {Op.EMBED: (cfg.d, 1), Op.QKV: ((cfg.G + 2) * cfg.Hkv * cfg.D, 2),
            Op.OPROJ: (cfg.d, 1), Op.GATEUP: (2 * cfg.I, 2), Op.DOWN: (cfg.d, 1),
            Op.LMHEAD: (cfg.V, 1), Op.RESID_SUM: (cfg.d, 1)}
    for op, (total, align) in rows.items():
        m = t.op == op
        bad = (a0 < 0) | (a1 < 1) | (a0 + a1 > total) | (a0 % align != 0) | (a1 % align != 0)
        if op not in (Op.EMBED, Op.RESID_SUM):
            bad |= a1 > max_rows
        _first(t, m & bad, lambda i, total=total, align=align: (
            f"rows/cols [{a0[i]}, {a0[i] + a1[i]}) must lie in [0, {total}), be a multiple "
            f"of {align} and (matvec) hold at most {max_rows} rows at batch {B}"))
    gcopy = np.where(t.op == Op.GATEUP, t.args[:, 5], 0)   # GATEUP copy (isa.py)
    _first(t, (gcopy != 0) & ((gcopy < 0) | (gcopy > 2) | (tp > 1)
                              | ((gcopy == 2) & (t.layer == cfg.L - 1))), lambda i: (
        f"GATEUP copy = {gcopy[i]}: 0, or under tp = 1 1 or (not on the last layer: resid "
        f"has no level {2 * cfg.L + 1}) 2"))
    # GATEUP's second copy (resid[2l+3]) is what the next ATTN_OPROJ adds onto: every DOWN of
    # its layer must add there too, and a K slice may only add there over such a copy.
    layer = np.clip(t.layer.astype(np.int64), -1, cfg.L)   # out of range: checked below
    g2 = np.zeros(cfg.L + 2, bool)
    g2[layer[gcopy == 2]] = True
    dcopy = (t.op == Op.DOWN) & (kn > 0) & (copy == 1)
    _first(t, (t.op == Op.DOWN) & (g2[layer] != dcopy), lambda i: (
        f"DOWN (kn, copy) = ({kn[i]}, {copy[i]}): a layer whose GATEUP copy 2 stores "
        f"resid[{2 * t.layer[i] + 3}] needs all K slices of its layer with copy = 1 (their "
        f"adds reach that level too), and a K slice with copy = 1 needs that GATEUP copy"))
    for op in isa.FOLD_OPS:
        k = isa.word_index(op, "fold") - len(isa.HEADER)
        f, c0, n = (t.args[:, k + j].astype(np.int64) for j in range(3))
        first = (op == Op.QKV) & (t.layer == 0)
        ranged = (c0 < 0) | (n < 0) | (c0 + n > cfg.d) | (c0 % 4 != 0) | (
            (n % 4 != 0) & (c0 + n != cfg.d))
        bad = np.where(f == 0, np.where(gcopy == 0, (c0 != 0) | (n != 0), ranged),
                       (f != 1) | (tp == 1) | first | ranged | (gcopy != 0))
        _first(t, (t.op == op) & bad, lambda i, op=op: (
            f"{op.name} fold fields (fold, sum_col0, sum_ncols) = {tuple(t.args[i, k:k + 3])}: "
            f"fold 0 with zero range (GATEUP copy > 0: its copy's range), or 1 (tp > 1, not "
            f"layer 0's QKV, no copy) with a range of whole 4-column vectors inside "
            f"[0, {cfg.d})"))
    NS, NLM = p.attn_splits, p.lm_slices
    h0, nh = (t.args[:, k].astype(np.int64) for k in (2, 3))
    merge, ticket = (t.args[:, k].astype(np.int64) for k in (3, 4))
    _first(t, (t.op == Op.ATTN) & np.where(merge == 0, ticket != 0,
                                           (merge != 1) | (ticket < 0) | (ticket >= C)),
           lambda i: f"(merge, ticket) = ({merge[i]}, {ticket[i]}): (0, 0), or 1 and a "
           f"counter in 0..{C - 1}")
    _first(t, (t.op == Op.ATTN_REDUCE) & ((h0 < 0) | (nh < 1) | (h0 + nh > cfg.G)), lambda i: (
        f"q heads [{h0[i]}, {h0[i] + nh[i]}) (head0, nheads) must lie in the group's "
        f"[0, {cfg.G})"))
    _first(t, (t.op == Op.ATTN_OPROJ) & ((a0 < 0) | (a0 >= cfg.H) | (a1 < 0) | (a2 < 1)
                                         | (a1 + a2 > cfg.D) | (a1 % 4 != 0) | (a2 % 4 != 0)),
           lambda i: (f"(head, dim0, ndims) = ({a0[i]}, {a1[i]}, {a2[i]}): head in "
                      f"0..{cfg.H - 1} and dims [dim0, dim0 + ndims) a non-empty range of "
                      f"whole 4-dim vectors (the kernel's) inside [0, {cfg.D})"))
    c0, nc = (t.args[:, k].astype(np.int64) for k in (3, 4))
    _first(t, (t.op == Op.ATTN_OPROJ) & ((c0 < 0) | (nc < 8) | (c0 + nc > cfg.d) | (c0 % 4 != 0)
                                         | (nc % 8 != 0)),
           lambda i: (f"(col0, ncols) = ({c0[i]}, {nc[i]}): columns inside [0, {cfg.d}), col0 a "
                      f"multiple of 4, ncols a multiple of 8 (the kernel's 8 columns per thread)"))
    for op, limits in ((Op.ATTN, (B, cfg.Hkv, NS)), (Op.ATTN_REDUCE, (B, cfg.Hkv)),
                       (Op.LMHEAD, (None, None, NLM))):
        for k, (v, lim) in enumerate(zip((a0, a1, a2), limits)):
            if lim is not None:
                _first(t, (t.op == op) & ((v < 0) | (v >= lim)), lambda i, k=k, lim=lim: (
                    f"field {isa.ARGS[Op(t.op[i])][k]} = {v[i]} outside 0..{lim - 1}"))
    nargs = np.zeros(max(Op) + 1, np.int64)
    nargs[[int(o) for o in Op]] = [len(isa.ARGS[o]) for o in Op]
    nargs = nargs[t.op]
    spare = (t.args != 0) & (np.arange(NUM_ARGS)[None, :] >= nargs[:, None])
    _first(t, spare.any(axis=1), lambda i: "words past the opcode's fields must be 0")
    first, count = t.waits[:, 0::2].astype(np.int64), t.waits[:, 1::2].astype(np.int64)
    bad = (count < 0) | np.where(count == 0, first != 0, (first < 0) | (first + count > C))
    _first(t, bad.any(axis=1), lambda i: (
        f"wait ranges {t.wait_ranges(i)} must be (0, 0) or inside the {C} counters"))
    _first(t, (t.signal < -1) | (t.signal >= C),
           lambda i: f"signal {t.signal[i]} outside -1..{C - 1}")


def _per_wait(t: Placed, per_counter: np.ndarray, fn) -> np.ndarray:
    """int64 [N, NUM_WAITS]: fn(per_counter[first:first+count]) for every wait, -1 where the
    wait is empty. fn is evaluated once per distinct range."""
    pairs = t.waits.reshape(-1, 2).astype(np.int64)
    keys, inverse = np.unique(pairs[:, 0] << 32 | pairs[:, 1], return_inverse=True)
    vals = np.array([fn(per_counter[k >> 32:(k >> 32) + (k & 0xFFFFFFFF)]) if k & 0xFFFFFFFF
                     else -1 for k in keys.tolist()], np.int64)
    return vals[inverse.reshape(-1)].reshape(len(t), isa.NUM_WAITS)


def _tickets(t: Placed, C: int) -> np.ndarray:
    """int64 [N]: the counter (global id, ranks.py) each merging ATTN takes, else -1."""
    merging = (t.op == Op.ATTN) & (t.args[:, 3] != 0)
    rank = 0 if t.rank is None else t.rank.astype(np.int64)
    return np.where(merging, rank * C + t.args[:, 4], -1)


def _check_counters(t: Placed, targets: np.ndarray, C: int, name, ticket) -> None:
    nsig = np.bincount(t.signal[t.signal >= 0], minlength=C)
    taken = np.bincount(ticket[ticket >= 0], minlength=C)
    both = np.flatnonzero((ticket >= 0) & (nsig[np.maximum(ticket, 0)] > 0))
    if len(both):
        _fail(t, int(both[0]), f"takes ticket {name(ticket[both[0]])}, which instructions "
              "also signal")
    wrong = np.flatnonzero(nsig + taken != targets)
    if len(wrong):
        c = int(wrong[0])
        sig = np.flatnonzero(t.signal == c)
        waiters = [i for i in range(len(t)) if any(f <= c < f + n for f, n in t.wait_ranges(i))]
        takers = np.flatnonzero(ticket == c)
        i = int(sig[0]) if len(sig) else int(takers[0]) if len(takers) else \
            waiters[0] if waiters else None
        msg = (f"{name(c)}: counter_targets says {int(targets[c])} but {int(nsig[c])} "
               f"instructions signal it and {int(taken[c])} take it as a ticket (waiters "
               "would hang or run early, or no split would merge)")
        if i is None:
            raise ValueError(f"invalid plan: {msg}")
        _fail(t, i, msg)
    zero_at = _per_wait(t, nsig, lambda s: int(np.argmin(s)) if s.min() == 0 else -1)
    for i, k in np.argwhere(zero_at >= 0)[:1]:
        c = int(t.waits[i, 2 * k] + zero_at[i, k])
        _fail(t, int(i), f"waits on {name(c)}, which no instruction signals")


def _check_tickets(t: Placed, ticket: np.ndarray, NS: int, name) -> None:
    """Each ticket is taken by the NS splits of one group, which signal one counter."""
    m = np.flatnonzero(ticket >= 0)
    if not len(m):
        return
    rank = np.zeros(len(t), np.int64) if t.rank is None else t.rank.astype(np.int64)
    keys = np.stack([rank[m], t.layer[m], t.args[m, 0], t.args[m, 1]], 1)
    group = np.unique(keys, axis=0, return_inverse=True)[1].ravel()
    for what, key in (("ticket", ticket[m]), ("signal", t.signal[m].astype(np.int64))):
        seen = np.zeros(group.max() + 1, np.int64)
        seen[group] = key
        bad = np.flatnonzero(key != seen[group])
        if len(bad):
            k = int(bad[0])
            _fail(t, int(m[k]), f"{what} {name(key[k])}, another split of its (layer, b, "
                  f"kv_head) has {name(seen[group[k]])}: a group's splits share one")
    owner = np.zeros(int(ticket.max()) + 1, np.int64)
    owner[ticket[m]] = group
    counts = np.bincount(ticket[m])
    bad = np.flatnonzero((owner[ticket[m]] != group) | (counts[ticket[m]] != NS))
    if len(bad):
        k = int(bad[0])
        _fail(t, int(m[k]), f"ticket {name(ticket[m[k]])} is taken by {counts[ticket[m[k]]]} "
              f"ATTN splits: it must be the NS = {NS} splits of one (layer, b, kv_head)")


def _check_order(t: Placed, C: int, name) -> Placed:
    uid = t.uid.astype(np.int64)
    rank = np.zeros(len(t), np.int64) if t.rank is None else t.rank.astype(np.int64)
    for r in np.unique(rank).tolist():
        rows = np.flatnonzero(rank == r)
        N = len(rows)
        if not np.array_equal(np.sort(uid[rows]), np.arange(N)):
            seen = np.zeros(N + 1, bool)
            for i, u in zip(rows.tolist(), uid[rows].tolist()):
                if u < 0 or u >= N or seen[u]:
                    _fail(t, i, f"uids must be 0..{N - 1}, each once (uid {u} repeated or "
                          "outside)")
                seen[u] = True
    claimed = t.sm == CLAIMED          # claims only under tp = 1 (_validate): one rank
    num_static = len(t) - int(claimed.sum())
    want = num_static + t.index.astype(np.int64)
    _first(t, claimed & (uid != want), lambda i: (
        f"claimed uid {uid[i]} is smaller than a static uid ({num_static} static "
        f"instructions, uids 0..{num_static - 1}): an SM claims only after its whole static "
        "queue, so claimed uids must follow every static one" if uid[i] < num_static else
        f"claim index {t.index[i]} must hold uid {want[i]}: claims must be in uid order "
        "(claim[k] has uid num_static + k), the order the SMs take them in"))
    same_sm = (t.sm[1:] == t.sm[:-1]) & ~claimed[1:] & (rank[1:] == rank[:-1])
    _first(t, np.r_[False, same_sm & (uid[1:] <= uid[:-1])], lambda i: (
        f"follows uid {uid[i - 1]} in SM {t.sm[i]}'s queue: queues must be sorted by uid (one "
        "global topological order); this order can deadlock co-resident blocks"))
    last = np.full(C, -1, np.int64)
    np.maximum.at(last, t.signal[t.signal >= 0], uid[t.signal >= 0])
    latest = _per_wait(t, last, lambda s: int(np.argmax(s)))
    counter = np.where(latest >= 0, t.waits[:, 0::2] + latest, 0)
    for i, k in np.argwhere((latest >= 0) & (last[counter] >= uid[:, None]))[:1]:
        c = int(counter[i, k])
        producer = int(np.flatnonzero((t.signal == c) & (uid == last[c]))[0])
        _fail(t, int(i), f"waits on {name(c)}, signalled by {t.where(producer)}, which is "
              "not earlier in the global order: the wait can deadlock")
    return t.take(np.lexsort((rank, uid)))
