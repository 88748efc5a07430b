"""Lowering: one Llama decode step -> a DAG of coarse instructions joined by counters.

`lower` returns the instructions in a topological order, stage by stage: EMBED; per layer
QKV, ATTN, ATTN_REDUCE, OPROJ, GATEUP, DOWN (fuse_oproj: QKV, ATTN, ATTN_OPROJ, GATEUP, DOWN);
then LMHEAD, ARGMAX. A stage is one (layer, opcode); no instruction depends on another of
its own stage. Each instruction has one signal counter (ARGMAX signals none) and one wait
range, two for the first stage after the attention block (below).

Counters are numbered stage by stage in the producers' output order. A stage's producers
are grouped into buckets, one counter per bucket, by the granularity:
    layer   one bucket per stage
    head    QKV slices by the kv group of their first row; ATTN by (b, kv_head)
    chunk   QKV: one per slice; ATTN by (b, kv_head) (one per split would not help: every
            ATTN_REDUCE waits on all NS splits of its group)
Every other stage is read whole by its consumers, so it is one bucket at any granularity.
ATTN_REDUCE cuts each (b, kv_head)'s G q heads into min(G, slices["reduce"] // (B * Hkv))
instructions (at least 1): one per group puts a whole group's NS * G * D partials on one
SM, a serial chain of L2 round trips on the critical path at large G * D (70B: 8 x 128).
With fuse_reduce there is no ATTN_REDUCE stage: every ATTN of a (b, kv_head) takes one
ticket counter (allocated after the stage's signal counters, target NS) and the last split
to take it merges the group (isa.py ATTN merge); OPROJ waits on the ATTN counters, which
then require bucketing every split of a group into one counter (true at every granularity).
With fuse_oproj (tp = 1) there is neither ATTN_REDUCE nor OPROJ: an ATTN_OPROJ stage follows
ATTN, one instruction per (q head h, dim slice), the slices even_split(D, slices["oproj"] //
H, 4) of every head (whole 4-dim vectors, as the kernel merges them), head-major. Each
merges its slice of the partials of every batch row, so it waits on the ATTN buckets
b * Hkv + h // G of every b: at granularity head/chunk the range from b = 0 to b = B-1
(over-covering other groups' buckets when B > 1). It adds into
resid[2l+1], whose initial value (the copy of resid[2l]) EMBED (copy = 1) or the previous
layer's DOWN (copy = 1, every layer but the last) stores; that store is ordered before the
adds transitively, through QKV and ATTN. The stage is one bucket; GATEUP waits on all of it.
With fuse_oproj and down_k_slices > 1 no DOWN holds a whole residual row: GATEUP instruction
k copies column range k of fold_ranges(d, n) of resid[2l+1] into resid[2l+2] and (copy = 2,
every layer but the last) resid[2l+3], and the DOWN K slices add into both (copy = 1), so
resid[2l+3] holds resid[2l+2] before the next ATTN_OPROJ adds to it. Both copies are ordered
before every add: the DOWNs wait on the whole GATEUP stage, and the next layer's QKV on them.
A consumer waits on the contiguous counter range of the buckets holding the producers
whose outputs it reads directly (isa.py says what each opcode reads); reads that are
ordered transitively (DOWN's resid[2l+1]) get no wait of their own, except across the
attention block: a build may have ATTN poll QKV's flagged outputs and ATTN_REDUCE (or
ATTN_OPROJ) ATTN's (MK_LL_Q, MK_LL_PARTIALS) instead of acquiring their counters, and a
relaxed store seen orders nothing else, so no order passes through those two stages (the
validator assumes so of ATTN in every build, dataflow.py). The stage after them (ATTN_OPROJ, or OPROJ) also waits,
first, on the stage before the layer's QKV (EMBED, DOWN, RESID_SUM: one counter), whose
residual it reads or adds to; under fold on the layer's QKV, whose residual GATEUP reads.

Tensor parallelism (`shard` given, isa.py): the rank lowers its shard config; OPROJ, DOWN
and LMHEAD are all-rank stages (peer stores, one counter bumped by every rank, its target
tp times the rank's own signalers); LMHEAD takes global vocab rows and slots. The partials
reach the residual either through the next reader (fold, isa.py: QKV of layer l >= 1,
GATEUP and LMHEAD sum them while staging their input, instruction k of a stage of n
writing column range k of fold_ranges(d, n)), or (fold=False) through a RESID_SUM stage
(EMBED's slicing) after OPROJ and DOWN, one more stage and counter hop each. A folding
reader waits on the all-rank counter itself; its read of resid[m-1] (written by the
previous folding stage) is ordered transitively, through the partials' producers.
Every rank's lowering has the same stages, counters and waits: only LMHEAD's fields differ.
"""
from __future__ import annotations

import dataclasses

import numpy as np

from megakernel.config import ModelConfig

from . import isa
from .isa import Op
from .slicing import even_split, qkv_split
from .table import NUM_ARGS, Instrs

GRANULARITIES = ("layer", "head", "chunk")
SLICED_OPS = ("embed", "qkv", "oproj", "gateup", "down", "lmhead", "reduce")


@dataclasses.dataclass
class Lowered:
    instrs: Instrs                # in lowering (topological) order
    stage: np.ndarray             # int32 [N] stage index, nondecreasing
    counter_targets: np.ndarray   # int32 [num_counters]
    attn_splits: int
    lm_slices: int


@dataclasses.dataclass(frozen=True)
class Shard:
    tp: int
    rank: int
    vocab: list                   # (first row, rows) of the LM head of every rank

class _Builder:
    def __init__(self):
        self.parts: list[tuple] = []
        self.targets: list[np.ndarray] = []
        self.num_counters = 0

    def stage(self, op: Op, layer: int, args, waits, buckets, all_ranks: int = 0) -> np.ndarray:
        """Append one stage. args [n, <=NUM_ARGS]; waits [n, 2k] (first, count) pairs, k <=
        NUM_WAITS, or None;
        buckets [n] nondecreasing bucket keys, or None for no signal; all_ranks: the number
        of ranks whose copies signal the same counters (0: a rank-local stage). Returns the
        counter index each instruction signals."""
        args = np.asarray(args, np.int32).reshape(len(args), -1)
        n = len(args)
        padded = np.zeros((n, NUM_ARGS), np.int32)
        padded[:, :args.shape[1]] = args
        w = np.zeros((n, 2 * isa.NUM_WAITS), np.int32)
        if waits is not None:
            w[:, :waits.shape[1]] = waits
        if buckets is None:
            signal = np.full(n, -1, np.int32)
        else:
            new = np.r_[True, np.diff(buckets) != 0]
            signal = (self.num_counters + np.cumsum(new) - 1).astype(np.int32)
            fanin = max(all_ranks, 1)
            self.targets.append(fanin * np.bincount(signal - self.num_counters).astype(np.int32))
            self.num_counters = int(signal[-1]) + 1
        self.parts.append((np.full(n, int(op), np.int32), np.full(n, layer, np.int32),
                           padded, w, signal, np.full(n, int(all_ranks > 0), np.int32),
                           np.full(n, len(self.parts), np.int32)))
        return signal

    def tickets(self, n: int, target: int) -> np.ndarray:
        """n counters that no instruction signals or waits on, each taken `target` times a
        step (ATTN merge tickets)."""
        ids = np.arange(self.num_counters, self.num_counters + n, dtype=np.int32)
        self.targets.append(np.full(n, target, np.int32))
        self.num_counters += n
        return ids

    def build(self) -> tuple[Instrs, np.ndarray, np.ndarray]:
        cols = [np.concatenate(c) for c in zip(*self.parts)]
        return Instrs(*cols[:6]), cols[6], np.concatenate(self.targets)


def _span(cids: np.ndarray, i0, i1) -> np.ndarray:
    """[n, 2] wait ranges covering the counters of producers [i0, i1) (arrays)."""
    first = cids[i0]
    return np.stack([first, cids[np.asarray(i1) - 1] - first + 1], axis=1)


def _all(cids: np.ndarray, n: int) -> np.ndarray:
    return _span(cids, np.zeros(n, np.int64), np.full(n, len(cids)))


def fold_ranges(d: int, n: int) -> np.ndarray:
    """[n, 2] (col0, ncols): [0, d) cut at multiples of 4 into n ranges, some maybe empty."""
    bounds = np.minimum(d, 4 * (np.arange(n + 1) * -(-d // 4) // n))
    return np.stack([bounds[:-1], np.diff(bounds)], axis=1)


def _copying(args: np.ndarray, copy: int) -> np.ndarray:
    """EMBED / DOWN args + the copy column (isa.py: 1 also stores into the next level)."""
    return np.column_stack([args, np.full(len(args), copy)])


def gateup_copies(args: np.ndarray, d: int, copy: int) -> np.ndarray:
    """GATEUP args + (fold = 0, sum_col0, sum_ncols, copy): instruction k copies column
    range k of fold_ranges(d, n) (isa.py GATEUP copy)."""
    n = len(args)
    return np.column_stack([args, np.zeros(n, np.int64), fold_ranges(d, n), np.full(n, copy)])


def _folding(args: np.ndarray, d: int) -> np.ndarray:
    """args + (fold = 1, sum_col0, sum_ncols) columns."""
    return np.column_stack([args, np.ones(len(args), np.int64), fold_ranges(d, len(args))])


def lower(cfg: ModelConfig, batch: int, granularity: str, attn_splits: int,
          slices: dict, shard: Shard | None = None, fold: bool = False,
          fuse_reduce: bool = False, fuse_oproj: bool = False, oproj_col_slices: int = 0,
          down_k_slices: int = 1) -> Lowered:
    """slices: target slice count per key of SLICED_OPS. cfg: the shard config under tp.
    fold: under tp, the readers of the residual sum the partials (else RESID_SUM stages).
    fuse_reduce: the last ATTN split of each group merges it (no ATTN_REDUCE stage).
    fuse_oproj: ATTN_OPROJ stages instead of ATTN_REDUCE and OPROJ (tp = 1), with
    oproj_col_slices column slices per (head, dim slice) (0: oproj_column_slices chooses).
    down_k_slices > 1 (tp = 1): DOWN rows in slices["down"] // down_k_slices row slices,
    each cut into down_k_slices K slices (down_k_ranges) that add into resid[2l+2], onto
    OPROJ's copy, or with fuse_oproj onto GATEUP's (isa.py)."""
    B, L, d, I, V, H = batch, cfg.L, cfg.d, cfg.I, cfg.V, cfg.H
    Hkv, G, D, NS = cfg.Hkv, cfg.G, cfg.D, attn_splits
    max_rows = isa.MAX_ROWS_TIMES_BATCH // B
    group_rows = (G + 2) * D

    embed = np.array(even_split(d, slices["embed"]))
    qkv = np.array(qkv_split(Hkv, group_rows, slices["qkv"], max_rows))
    oproj = np.array(even_split(d, slices["oproj"], 1, max_rows))
    gateup = np.array(even_split(2 * I, slices["gateup"], 2, max_rows))
    down = np.array(even_split(d, max(1, slices["down"] // down_k_slices), 1, max_rows))
    if down_k_slices > 1:                      # every row slice times every K slice
        ks = down_k_ranges(I, down_k_slices)
        down, down_k = np.repeat(down, len(ks), axis=0), np.tile(ks, (len(down), 1))
    else:
        down_k = np.zeros((len(down), 2), np.int64)                # kn = 0: the whole of I
    per_head = max(1, slices["oproj"] // H)
    ncols = d // oproj_column_slices(d, per_head, oproj_col_slices)
    dims = np.array(even_split(D, max(1, per_head * ncols // d), 4))
    cols = np.column_stack([np.arange(0, d, ncols), np.full(d // ncols, ncols)])
    fused = np.column_stack([np.repeat(np.arange(H), len(dims) * len(cols)),     # (head,
                             np.tile(np.repeat(dims, len(cols), axis=0), (H, 1)),  # dim0, ndims,
                             np.tile(cols, (H * len(dims), 1))])                  # col0, ncols)
    first_attn = (fused[:, 0] // G) * NS                        # ATTN of (b = 0, g = h // G)
    last_attn = ((B - 1) * Hkv + fused[:, 0] // G + 1) * NS     # end of (b = B-1, g)
    copy = int(fuse_oproj)
    gateup_copy = fuse_oproj and down_k_slices > 1     # no DOWN stores a whole residual row
    lm = _lm_rows(V, slices["lmhead"], max_rows, shard)
    peers = 0 if shard is None else shard.tp          # all_ranks of OPROJ, DOWN and LMHEAD
    fold = fold and peers > 0

    # QKV slices [g_i0[g], g_i1[g]) hold kv group g's rows.
    groups = np.arange(Hkv)
    g_i0 = np.searchsorted(qkv[:, 0] + qkv[:, 1], groups * group_rows, "right")
    g_i1 = np.searchsorted(qkv[:, 0], (groups + 1) * group_rows, "left")
    attn = np.stack(np.meshgrid(np.arange(B), groups, np.arange(NS), indexing="ij"), -1)
    attn = attn.reshape(-1, 3)                                       # (b, kv_head, split)
    pieces = np.array(even_split(G, max(1, slices["reduce"] // (B * Hkv))))   # (head0, n)
    reduce = np.column_stack([np.repeat(attn[::NS, :2], len(pieces), axis=0),
                              np.tile(pieces, (B * Hkv, 1))])      # (b, kv_head, head0, nheads)
    bg = reduce[:, 0] * Hkv + reduce[:, 1]
    zeros = {n: np.zeros(n, np.int64) for n in {len(embed), len(qkv), len(attn), len(reduce),
                                                len(oproj), len(gateup), len(down), len(lm),
                                                len(fused)}}
    qkv_buckets = {"layer": zeros[len(qkv)], "head": qkv[:, 0] // group_rows,
                   "chunk": np.arange(len(qkv))}[granularity]
    attn_buckets = zeros[len(attn)] if granularity == "layer" else attn[:, 0] * Hkv + attn[:, 1]

    b = _Builder()
    prev = b.stage(Op.EMBED, -1, _copying(embed, copy), None, zeros[len(embed)])
    for layer in range(L):
        args = _folding(qkv, d) if fold and layer > 0 else qkv
        c = qkv_c = b.stage(Op.QKV, layer, args, _all(prev, len(qkv)), qkv_buckets)
        qkv_waits = _span(c, g_i0[attn[:, 1]], g_i1[attn[:, 1]])
        # The first stage after the attention block also waits on what it reads from before
        # it (flagged hops: ATTN and ATTN_REDUCE may poll data, not acquire counters, so no
        # order passes through them): the residual level `prev` wrote (a 1-counter stage),
        # or under fold the one this layer's QKV wrote (GATEUP reads it). First of the two
        # ranges: complete long before, its poll overlaps the wait for the block's end.
        def after_attn(waits):
            n = len(waits)
            return np.column_stack([_all(qkv_c if fold else prev, n), waits])
        if fuse_reduce:
            ticket = b.tickets(B * Hkv, NS)[attn[:, 0] * Hkv + attn[:, 1]]
            merged = np.column_stack([attn, np.ones(len(attn), np.int64), ticket])
            c = b.stage(Op.ATTN, layer, merged, qkv_waits, attn_buckets)
        else:
            c = b.stage(Op.ATTN, layer, attn, qkv_waits, attn_buckets)
            if fuse_oproj:
                c = b.stage(Op.ATTN_OPROJ, layer, fused,
                            after_attn(_span(c, first_attn, last_attn)), zeros[len(fused)])
            else:
                c = b.stage(Op.ATTN_REDUCE, layer, reduce, _span(c, bg * NS, (bg + 1) * NS),
                            zeros[len(reduce)])
        more = int(layer < L - 1)
        mlp = ((Op.GATEUP, gateup_copies(gateup, d, 1 + more) if gateup_copy else gateup),
               (Op.DOWN, np.column_stack([_copying(down, copy * more), down_k])))
        oproj_copy = _copying(oproj, int(down_k_slices > 1))
        for op, rows in (mlp if fuse_oproj else ((Op.OPROJ, oproj_copy),) + mlp):
            remote = 0 if op == Op.GATEUP else peers
            args = _folding(rows, d) if fold and op == Op.GATEUP else rows
            waits = _all(c, len(rows))
            c = b.stage(op, layer, args, after_attn(waits) if op == Op.OPROJ else waits,
                        zeros[len(rows)], remote)
            if remote and not fold:
                sums = np.column_stack([embed, np.full(len(embed), int(op == Op.DOWN))])
                c = b.stage(Op.RESID_SUM, layer, sums, _all(c, len(sums)), zeros[len(embed)])
        prev = c
    c = b.stage(Op.LMHEAD, -1, _folding(lm, d) if fold else lm, _all(prev, len(lm)),
                zeros[len(lm)], peers)
    b.stage(Op.ARGMAX, -1, np.zeros((1, 0)), _all(c, 1), None)
    instrs, stage, targets = b.build()
    return Lowered(instrs, stage, targets, attn_splits=NS, lm_slices=max(peers, 1) * len(lm))


def down_k_ranges(I: int, n: int) -> np.ndarray:
    """[n', 2] (k0, kn): [0, I) in n' <= n slices of whole isa.DOWN_K_ALIGN units."""
    if I % isa.DOWN_K_ALIGN:
        raise ValueError(f"down_k_slices needs an FFN width that is a multiple of "
                         f"{isa.DOWN_K_ALIGN}, got I={I}")
    return np.array(even_split(I, n, isa.DOWN_K_ALIGN))


def oproj_column_slices(d: int, per_head: int, col_slices: int) -> int:
    """Column slices of ATTN_OPROJ: col_slices equal ones, or (0) the most, a power of two up
    to per_head, of a width the kernel takes (a multiple of 8 columns)."""
    def fits(n):
        return d % n == 0 and (d // n) % 8 == 0
    if col_slices:
        if not fits(col_slices):
            raise ValueError(f"oproj_col_slices={col_slices}: d={d} must split into that many "
                             "equal slices of a multiple of 8 columns")
        return col_slices
    n = 1
    while 2 * n <= per_head and fits(2 * n):
        n *= 2
    return n


def _lm_rows(V: int, target: int, max_rows: int, shard: Shard | None) -> np.ndarray:
    """[n, 3] (row0, nrows, slot) of the rank's LMHEAD slices. Under tp every rank gets the
    same number of slices, so its slots [rank*n, (rank+1)*n) and the counters line up."""
    if shard is None:
        lm = np.array(even_split(V, target, 1, max_rows))
        return np.column_stack([lm, np.arange(len(lm))])
    sizes = [n for _, n in shard.vocab]
    n = min(len(even_split(max(sizes), target, 1, max_rows)), min(sizes))
    v0, nv = shard.vocab[shard.rank]
    lm = np.array(even_split(nv, n, 1, max_rows)) + [v0, 0]
    assert len(lm) == n, (len(lm), n)
    return np.column_stack([lm, shard.rank * n + np.arange(n)])
