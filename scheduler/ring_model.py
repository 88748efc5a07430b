"""Ring model: the cost model with the kernel's weight ring in it, so the prefetch switches of
an ablation (ring depth, pages in flight, the attention chain's cap, prefetch off) get a
prediction of their own instead of the default's.

simulate.py charges a matvec its weight bytes at the SM's bandwidth share as if they streamed
the moment it starts; what the ablations measure is when they stream. Here each SM has the
kernel's loader and consumers (csrc/loader.cuh, matvec.cuh):

- The loader walks the SM's queue in order, one 32 KB ring page after the other (pages per
  instruction from the kernel's matvec geometry, `matvec_pages`). Page k is issued once a
  slot is free (page k - slots consumed), fewer than `inflight` pages are in flight (page
  k - inflight landed; `chain_inflight` while the attention chain's flag is set, below) and,
  without prefetch, once its instruction's waits hold.
- A page lands `ring_mem_latency_us` after its issue (a loaded HBM round trip, its
  transfer included) and not before the page ahead of it has landed plus its own bytes at
  the SM's share of HBM (GpuSpec.sm_bytes_per_s(num_sms), as simulate.py): the SM's copies
  land in order, at most at that rate. With the latency about one page's transfer, one
  page in flight about keeps the share busy (Little's law: 132 SMs x 32 KB in flight at
  ~2.9 TB/s is ~1.5 us), two hide its variation.
- The consumers start an instruction when its SM is free and its counters are complete +
  counter_latency_us (a range of n signallers: + ring_spread_us * straggle(n), the lag of
  the last of n SMs whose end times scatter with that standard deviation; the model's own
  ends are deterministic), + ring_queue_us per copy of the SM in flight then: the wait's last
  poll is a dependent load, which queues behind the SM's pages in flight (bench/NOTES.md,
  sessions 26-29; the traces' hops: ~2 us into QKV, ~0.7 into the capped attention chain).
  Its head then takes ring_queue_us per copy still in flight (its staging loads queue
  likewise) plus its fixed time (ring_head_us; ATTN: ring_attn_us, ATTN_REDUCE:
  ring_merge_us, ATTN_OPROJ: both head and merge) plus its non-weight bytes at the SM's
  share. Then it takes each page once landed, `ring_page_us` a page (`ring_page_us_tc` on
  tensor cores), and frees its slot. bench/trace.py `ring_constants` measures the fixed
  times and page times off a trace's page stamps by these same rules.
- The chain flag (MK_CHAIN_INFLIGHT, csrc/common.cuh chain_op): set when an ATTN,
  ATTN_REDUCE, ATTN_OPROJ or OPROJ (and QKV with chain_qkv, DOWN with chain_down) is
  dispatched, cleared when the next instruction off the chain (DOWN: itself) has passed its
  wait.

What it leaves out: the other SMs' idle bandwidth (each SM streams at its fixed share, so
HBM "idles" exactly when rings are full; a page issued after a quiet spell takes no less in
the traces, and a global pool of bandwidth made the model worse), L2 hits, the LM head's
longer epilogue at batch 8 (~10 us), the loader's small-input prefetch, the
flagged hops (MK_LL_*), register and code effects of a build flag. So it predicts what the
ring's shape does to a plan, not what a new kernel mechanism does: `RingModel.for_build`
returns None for a build flag or ablation it does not know. Static programs only (claimed
records have no SM to stream on until run time).
"""
from __future__ import annotations

import bisect
import dataclasses
import re
from statistics import NormalDist

import numpy as np

from megakernel.config import ModelConfig

from .cost import GpuSpec, instruction_bytes_flops
from .isa import Op
from .simulate import Timeline, wait_ready
from .table import CLAIMED, Instrs

PAGE_BYTES = 32 * 1024          # MK_PAGE_KB
SLOT_BYTES = PAGE_BYTES + 256   # kSlotBytes: a page plus 16 bytes for each of 16 rows
TC_MIN_BATCH = 3                # kTcMinBucket = 4: batch buckets 4 and up (batch >= 3)
AXPY_COLS = 8 * 256             # kAxpyCols: ATTN_OPROJ's columns per chunk
CHAIN_OPS = (Op.ATTN, Op.ATTN_REDUCE, Op.ATTN_OPROJ, Op.OPROJ)


@dataclasses.dataclass(frozen=True)
class RingModel:
    slots: int                  # ring slots per SM
    inflight: int               # pages in flight off the chain (0: as many as slots)
    chain_inflight: int = 0     # pages in flight while the chain flag is set (0: no cap)
    chain_qkv: bool = False     # QKV sets the flag
    chain_down: bool = False    # DOWN sets it (cleared at its own wait's end)
    prefetch: bool = True       # False: an instruction's pages issue only once its waits hold
    act_floats: int = 8192      # MK_ACT_FLOATS of the build (activation chunk, fp32)

    def __post_init__(self):
        if self.slots < 1 or self.inflight < 0 or self.chain_inflight < 0 or self.act_floats < 64:
            raise ValueError(f"RingModel: slots >= 1, inflight and chain_inflight >= 0, "
                             f"act_floats >= 64; got {self}")

    @classmethod
    def for_build(cls, batch: int, build_flags=(), ablate=(), variant: str = "auto"):
        """The ring of the kernel a Runtime would launch for `batch` with these build flags,
        ablations and variant (runtime.choose_variant: "auto" takes the batch-1/2 build at
        batch <= 2, as it does for the presets), or None where one of them changes something
        this model does not see (a flag other than the ring's, a diagnostic ablation)."""
        flags = {}
        for f in build_flags:
            m = re.fullmatch(r"-D(MK_[A-Z0-9_]+)(?:=(-?\d+))?", f)
            if not m:
                return None
            flags[m.group(1)] = int(m.group(2) if m.group(2) is not None else 1)
        if set(flags) - set(_RING_FLAGS) or set(ablate) - {"no_prefetch"}:
            return None
        b1 = batch <= 2 and variant != "default"
        tc = batch >= TC_MIN_BATCH
        pages = flags.get("MK_NUM_PAGES", 5 if b1 else 4)
        raw_slot = bool(flags.get("MK_RAW_SLOT", 1)) and not tc   # the tc staging area
        cap = flags.get("MK_CHAIN_INFLIGHT", 1)
        return cls(slots=pages + raw_slot, inflight=flags.get("MK_INFLIGHT_PAGES", 2),
                   chain_inflight=cap, chain_qkv=bool(cap and flags.get("MK_CHAIN_QKV", 1)),
                   chain_down=bool(cap and flags.get("MK_CHAIN_DOWN", 1)),
                   prefetch="no_prefetch" not in ablate, act_floats=4096 if b1 else 8192)


# Build flags whose whole effect is the ring's shape (for_build reads each).
_RING_FLAGS = ("MK_NUM_PAGES", "MK_RAW_SLOT", "MK_INFLIGHT_PAGES", "MK_CHAIN_INFLIGHT",
               "MK_CHAIN_QKV", "MK_CHAIN_DOWN")


def _shape(ins: Instrs, cfg: ModelConfig) -> tuple[np.ndarray, np.ndarray]:
    """(rows, cols) int64 [N] of each instruction's weight block (0 for the ops without
    weights): a matvec's rows of K columns (DOWN: its K slice), ATTN_OPROJ's ndims rows of
    ncols columns."""
    op, a = ins.op, ins.args.astype(np.int64)
    rows, cols = a[:, 1].copy(), np.zeros(len(op), np.int64)
    for o, k in ((Op.QKV, cfg.d), (Op.GATEUP, cfg.d), (Op.LMHEAD, cfg.d),
                 (Op.OPROJ, cfg.H * cfg.D)):
        cols[op == o] = k
    down = op == Op.DOWN
    cols[down] = np.where(a[down, 4] > 0, a[down, 4], cfg.I)
    ax = op == Op.ATTN_OPROJ
    rows[ax], cols[ax] = a[ax, 2], a[ax, 4]
    rows[cols == 0] = 0
    return rows, cols


def matvec_pages(ins: Instrs, cfg: ModelConfig, batch: int, act_floats: int) -> np.ndarray:
    """int64 [N]: ring pages of each instruction (0 for the ops without weights), as the
    kernel's matvec geometry cuts them (csrc/matvec_geometry.cuh: row groups of rpp rows times
    chunks of kc columns; ATTN_OPROJ's axpy chunks of at most kAxpyCols columns)."""
    B, elems = batch, PAGE_BYTES // 2
    rows, K = _shape(ins, cfg)
    K1 = np.maximum(K, 1)
    if batch >= TC_MIN_BATCH:
        nt = -(-B // 8)
        kc = np.minimum(K1, (act_floats // (8 * nt)) & ~15)
        stride = ((kc >> 3) | 1) << 4
        rpp = np.maximum(1, np.minimum(elems // kc, SLOT_BYTES // stride))
    else:
        kc = np.minimum(K1, min(elems, (act_floats // B) & ~7))
        rpp = np.maximum(1, elems // kc)
    ax = ins.op == Op.ATTN_OPROJ
    kc[ax] = np.minimum(K1[ax], AXPY_COLS)
    rpp[ax] = np.maximum(1, elems // kc[ax])
    return np.where(K > 0, -(-rows // rpp) * -(-K // kc), 0)


def _weight_bytes(ins: Instrs, cfg: ModelConfig, wb: int) -> np.ndarray:
    """float64 [N]: weight bytes each instruction streams through the ring."""
    rows, cols = _shape(ins, cfg)
    return (rows * cols * wb).astype(np.float64)


def landing(issue: float, ahead: float, transfer_us: float, mem_latency_us: float) -> float:
    """When a ring page issued at `issue` lands: ring_mem_latency_us after its issue, and its
    transfer at the SM's share after the page ahead of it landed (`ahead`; the first page of
    an SM: its own issue)."""
    return max(issue + mem_latency_us, ahead + transfer_us)


def straggle(n) -> np.ndarray:
    """Expected maximum of n standard normal draws (Blom's approximation; 0 for n <= 1): how
    many standard deviations of n signallers' end times the last ends past their median."""
    n = np.asarray(n, np.float64)
    p = np.clip((n - 0.375) / (n + 0.25), 0.5, None)
    return np.array([NormalDist().inv_cdf(x) for x in np.atleast_1d(p)]).reshape(n.shape)


def simulate_ring(program, ring: RingModel, spec=None) -> Timeline:
    """Predicted timeline of one step of a static `program` with the weight ring `ring` on
    `spec` (default the program's gpu): the model of this module's docstring."""
    return ring_stamps(program, ring, spec)[0]


def ring_stamps(program, ring: RingModel, spec=None) -> tuple[Timeline, np.ndarray]:
    """simulate_ring's timeline and the ring-page stamps the kernel's timing build would
    record if the model were exact: float64 [num_sms, most pages of an SM, 4] us, per SM its
    pages in queue order (loader issue, consumer wait start, wait end, done), then 0."""
    program.require_static("ring_model.simulate_ring")
    spec = program.gpu if spec is None else GpuSpec.load(spec)
    if program.tp != 1:
        raise ValueError("ring_model.simulate_ring models one GPU (tp = 1)")
    cfg, B = program.config, program.batch
    t = program.table()
    t = t.take(np.argsort(t.uid, kind="stable"))
    nbytes, _ = instruction_bytes_flops(t, cfg, B, program.attn_splits, program.lm_slices, spec,
                                        program.options["kv_position"], program.tp)
    wbytes = _weight_bytes(t, cfg, spec.weight_bytes)
    npages = matvec_pages(t, cfg, B, ring.act_floats)
    rate = spec.sm_bytes_per_s(program.num_sms) / 1e6          # bytes per us
    fixed = np.full(len(t), spec.ring_head_us)
    fixed[t.op == Op.ATTN] = spec.ring_attn_us
    fixed[t.op == Op.ATTN_REDUCE] = spec.ring_merge_us
    fixed[t.op == Op.ATTN_OPROJ] += spec.ring_merge_us
    head = fixed + np.maximum(nbytes - wbytes, 0.0) / rate
    page_us = spec.ring_page_us_tc if B >= TC_MIN_BATCH else spec.ring_page_us
    lat, mem = spec.counter_latency_us, spec.ring_mem_latency_us
    # the last of a wait range's n signallers ends spread_us * straggle(n) after the others
    signallers = np.cumsum(np.r_[0, np.bincount(t.signal[t.signal >= 0],
                                                minlength=program.num_counters)])
    late = spec.ring_spread_us * straggle(np.arange(signallers[-1] + 1))

    def lag(first, count):
        return late[signallers[first + count] - signallers[first]]
    R, F, FC = ring.slots, ring.inflight or ring.slots, ring.chain_inflight
    chain_ops = set(map(int, CHAIN_OPS)) | ({int(Op.QKV)} if ring.chain_qkv else set())

    S = program.num_sms
    # Per SM, its pages in queue order (instructions in uid order are in queue order): the
    # instruction each belongs to, and issue / land / freed times filled in as they are known.
    owner = [np.repeat(np.flatnonzero(t.sm == s), npages[t.sm == s]) for s in range(S)]
    issue = [np.full(len(o), np.inf) for o in owner]
    land = [np.full(len(o), np.inf) for o in owner]
    freed = [np.full(len(o), np.inf) for o in owner]
    waited = [np.zeros((len(o), 2)) for o in owner]       # consumer wait start, wait end
    issued = [0] * S                    # pages issued, and consumed, per SM
    consumed = [0] * S
    per_page = np.where(npages > 0, wbytes / np.maximum(npages, 1) / rate, 0.0)   # us
    ready_at = np.full(len(t), np.inf)
    # dispatched instructions per SM: dispatch time, wait end, and the chain flag they set
    # (1: a chain op, held through the next off-chain wait; 2: DOWN, to its own wait's end)
    disp = [[] for _ in range(S)]
    wend = [[] for _ in range(S)]
    flag = [[] for _ in range(S)]

    def chained(s, when):
        """Whether SM s's chain flag is set at `when` (as far as its dispatches are known)."""
        j = bisect.bisect_right(disp[s], when) - 1
        if j < 0:
            return False
        if flag[s][j] == 1:
            return True
        held = flag[s][j] == 2 or (j > 0 and flag[s][j - 1] == 1)
        return held and when < wend[s][j]

    def issue_known(s, i):
        """Issue SM s's pages as far as their conditions are known while instruction i is
        the latest visited: a slot freed by a consumed page, the pages ahead landed (the
        in-flight caps), and without prefetch the page's instruction's waits."""
        k, own, iss, lnd = issued[s], owner[s], issue[s], land[s]
        while k < len(own) and k - R < consumed[s] and (ring.prefetch or own[k] <= i):
            when = iss[k - 1] if k else 0.0
            if k >= R:
                when = max(when, freed[s][k - R])
            if not ring.prefetch:
                when = max(when, ready_at[own[k]])
            if k >= F:
                when = max(when, lnd[k - F])
            if FC and k >= FC and chained(s, when):
                when = max(when, lnd[k - FC])
            iss[k] = when
            pp = per_page[own[k]]
            lnd[k] = landing(when, lnd[k - 1] if k else when, pp, mem)
            k += 1
        issued[s] = k

    def in_flight(s, when):
        """SM s's copies issued by `when` and not landed then."""
        j = int(np.searchsorted(issue[s][:issued[s]], when, side="right"))
        return int(np.count_nonzero(land[s][:j] > when))

    done = np.zeros(program.num_counters)
    sm_free = np.zeros(S)
    start, end = np.empty(len(t)), np.empty(len(t))
    waits, signal, sms = t.waits.tolist(), t.signal.tolist(), t.sm.tolist()
    for i, (w, c, s) in enumerate(zip(waits, signal, sms)):
        if s == CLAIMED:   # require_static has ruled these out
            raise AssertionError("claimed record in a static program")
        ready = ready_at[i] = wait_ready(done, w, lat, lag)
        dispatch = sm_free[s]
        start[i] = max(dispatch, ready)
        op = int(t.op[i])
        disp[s].append(dispatch)
        wend[s].append(start[i])
        flag[s].append(1 if op in chain_ops else 2 if (op == Op.DOWN and ring.chain_down) else 0)
        issue_known(s, i)
        # the wait's last poll, then the head's loads, queue behind the SM's copies in flight
        start[i] += spec.ring_queue_us * in_flight(s, start[i])
        wend[s][-1] = start[i]
        cur = start[i] + spec.ring_queue_us * in_flight(s, start[i]) + head[i]
        for k in range(consumed[s], consumed[s] + int(npages[i])):
            waited[s][k] = cur, max(cur, land[s][k])   # issued: its slot is one consumed before
            cur = freed[s][k] = waited[s][k, 1] + page_us
            consumed[s] = k + 1
            issue_known(s, i)
        end[i] = sm_free[s] = cur
        if c >= 0:
            done[c] = max(done[c], end[i])
    stamps = np.zeros((S, max(map(len, owner)), 4))
    for s in range(S):
        stamps[s, :len(owner[s])] = np.column_stack([issue[s], waited[s], freed[s]])
    return Timeline(spec.name + " (ring model)", S, t.uid, t.sm.copy(), t.op, t.layer, start,
                    end), stamps
