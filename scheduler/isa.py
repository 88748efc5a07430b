"""The megakernel instruction set: the ONE definition of opcodes and record layout.

csrc/generated/isa.cuh is generated from this module (`python -m megakernel.scheduler.isa`
rewrites it; tests/test_isa.py fails when the checked-in header is stale).

Record: WORDS int32 words. Words 0..7 are common to every opcode, words 8.. are the
opcode's own fields (ARGS[op], in order). Opcode 0 is NOP and ends an SM's queue.

    0 opcode   1 layer   2 uid (global instruction id, for traces and watchdog reports)
    3 wait0_first  4 wait0_count  5 wait1_first  6 wait1_count   (counter ranges)
    7 signal   (counter index bumped by +1 after the outputs are visible; -1 = none)
    15 all_ranks (word WORDS-1, tensor parallelism only; 0 under tp=1): 1 = the outputs are
       stored into EVERY rank's buffers (peer stores, this rank's own included) and the
       signal counter is bumped on every rank (system-scope release), else 0

Synchronisation: counters are int32 in global memory, monotonic across steps. `epoch` counts
completed steps since a reset and `done` the blocks that finished (monotonic): the block
whose increment makes done == num_sms * (epoch + 1) advances epoch. For the
epoch e (0 for the first step after a reset) an instruction may start once every counter c
in its wait ranges satisfies counter[c] - target[c] * (e + 1) >= 0 (wrapping int32
arithmetic). A producer writes its outputs, fences (release, gpu scope), then adds 1 to
its signal counter. target[c] equals the number of instructions whose signal is c, or for a
ticket counter (ATTN merge) the number of ATTN instructions taking it.

Buffers (all activations fp32 unless said; "SSA": every element is written once per step):
    tokens  [B] int64          input token ids (host/device writes before the step)
    pos     [B] int32          position of this step's token in each sequence
    resid   [2L+1, B, d]       resid[0] = embedding; resid[2l+1] = after attention of layer l;
                               resid[2l+2] = after the MLP of layer l
    q       [L, B, H, D]       RoPE'd queries
    q_ll    [L, B, H, D/2, 4] int32, kv_ll [L, B, Hkv, 2, D/2, 4] int32   GPU build
                               -DMK_LL_Q=1 only: q (unit u: dims u, u + D/2) and this step's
                               k (the same) and v (dims 2u, 2u+1, bf16 values) as flagged
                               pairs (see part_ll), which ATTN polls instead of waiting on the
                               QKV counters; synchronisation state (reset)
    x_ll    [L, B, d, 2] int32     GPU build -DMK_LL_X=1 only: resid[2l+2] again as flagged
                               elements {x, tag} (one 8-byte store each), written by DOWN of
                               layer l, which QKV of layer l+1 (LMHEAD after the last layer)
                               polls instead of waiting on the DOWN counter at tp = 1 on CUDA
                               cores; synchronisation state (reset)
    k_cache, v_cache [L, B, Hkv, S, D]   weight dtype (bf16 on the GPU)
    o_part  [L, B, H, NS, D]   attention partial outputs (normalised per split)
    lse     [L, B, H, NS]      natural-log sum-exp of the scaled scores per split (-inf if empty)
    part_ll [L, B, H, NS, D/2+1, 4] int32   GPU build -DMK_LL_PARTIALS=1 only: o_part and
                               lse again as flagged pairs {x, tag, x', tag} (tag = epoch + 1;
                               unit D/2 holds lse twice), which ATTN_REDUCE (ATTN_OPROJ)
                               polls instead of waiting on the ATTN counters;
                               synchronisation state (reset)
    attn    [L, B, H*D]        merged attention output (head-major)
    act     [L, B, I]          silu(gate) * up
    logits  [B, V]
    amax_val [B, NLM] fp32, amax_idx [B, NLM] int32   per-LM-head-instruction argmax partials
    out_tokens [B] int64       greedy next tokens
    rope_cos, rope_sin [S, D/2] fp32 (Llama-3 scaled frequencies, megakernel.rope)
    part    [2L, TP, B, d]     tp > 1 only: part[2l][src] = rank src's O-proj partial of
                               layer l, part[2l+1][src] = its down-proj partial
where NS = Program.attn_splits and NLM = Program.lm_slices.

Tensor parallelism (tp = TP > 1, Megatron style; plan() returns a TpProgram of TP per-rank
Programs). Every rank holds a full residual stream and its own buffers, sized by the shard
config (scheduler/sharding.py: H/TP heads, Hkv/TP kv heads, I/TP FFN) except resid, part,
logits and the LM-head partials (full V, NLM = all ranks' LMHEAD instructions). Indices in
records are the rank's own (local heads, local FFN columns) except LMHEAD's rows and slot,
which are global: rank r owns vocab rows [v0_r, v1_r) (even_split(V, TP)) and its lm_head
shard row i is vocab row v0_r + i. Under tp > 1 OPROJ, DOWN and LMHEAD carry all_ranks = 1:
    OPROJ       part[2l][rank][:, r0:r0+n] = attn[l] @ wo[l][r0:r0+n].T   on every rank
    DOWN        part[2l+1][rank][:, r0:r0+n] = act[l] @ wdown[l][r0:r0+n].T   on every rank
    LMHEAD      as below, its logits rows and amax slot written on every rank
and RESID_SUM folds the partials into this rank's residual, or (plan option fold, off by
default) the readers of that residual fold them themselves. With fold = 1 a QKV (layer
>= 1), GATEUP or LMHEAD instruction whose input level is m (2l, 2l+1, 2L) does not find
resid[m] written:
    x = resid[m-1] + part[m-1][0] + ... + part[m-1][TP-1]   (that order, as RESID_SUM)
is its input, and it writes x[:, sum_col0 : sum_col0+sum_ncols] to resid[m]; the stage's
ranges cover [0, d) once, at multiples of 4 columns (the kernel's vector width). Every
instruction of the stage computes the same bits, so resid[m] is what RESID_SUM would have
written, without the stage and its counter hop. Counters live in each rank's own
array; a counter signalled with all_ranks counts the signals of every rank (its target is
the number of signalers on all ranks), and its index is the same on every rank. Peer
stores are visible on the target before the signal's bump there (system-scope release). A
rank's step ends (ARGMAX) waiting on every rank's LMHEAD, which transitively follows every
instruction of every rank in the step, so no peer store or bump of step e+1 can overtake
a read or wait of step e.

Packed weights (megakernel.packing; the CPU interpreter and the GPU read the same layout):
    embed [V, d]; lm_head [V, d] (the embedding itself when tied)
    attn_norm [L, d], mlp_norm [L, d], final_norm [d]
    wqkv [L, Hkv*(G+2)*D, d], G = H // Hkv, kv-group-major: for group g the rows are
        q heads g*G .. g*G+G-1 (D rows each), then k head g, then v head g. Inside every q and
        k head the rows are pair-interleaved: packed row 2p holds dim p, row 2p+1 holds dim
        p + D/2, so any even-aligned slice holds whole RoPE pairs. v rows keep their order.
    wo [L, d, H*D]
    wgu [L, 2I, d]: packed row 2j = gate row j, 2j+1 = up row j.
    wdown [L, d, I]
Under tp = TP > 1 rank r's packed weights (pack_weights(weights, tp=TP, rank=r)) are this
layout for the shard config, cut from the full one: wqkv the rows of kv groups
[r*Hkv/TP, (r+1)*Hkv/TP); wo the columns of those groups' q heads; wgu the packed rows of FFN
units [r*I/TP, (r+1)*I/TP) and wdown the matching columns; lm_head rows [v0_r, v1_r); embed
and the norms whole.

Opcodes (rows are packed rows of the op's matrix; slices of QKV and GATEUP are even):
    EMBED       resid[0][b, c0:c0+n] = embed[tokens[b], c0:c0+n] for every b; copy = 1: the
                same values also into resid[1] (the initial value that ATTN_OPROJ adds to)
    QKV         x = rmsnorm(resid[2l], attn_norm[l]); y = x @ wqkv[l][r0:r0+n].T; RoPE at
                pos[b] on q/k pairs; q -> q[l], k/v -> k_cache/v_cache[l, b, g, pos[b]]
    ATTN        decode attention of kv head g, batch row b, split s of NS, over positions
                0..pos[b] of layer l. With n = pos[b]+1 and c = ceil(n / NS) the split covers
                [s*c, min(n, (s+1)*c)); it writes o_part/lse of the G q heads of group g
                (o = 0, lse = -inf when the range is empty). Scale 1/sqrt(D).
                merge = 1 (plan option fuse_reduce): then it adds 1 to counter `ticket`
                (acq_rel, gpu scope; never waited on, its target is NS), and the split whose
                add brings it to target * (epoch + 1) is the last of its group: it merges the
                group's NS partials of all G q heads into attn[l, b] as ATTN_REDUCE would,
                before its signal. Its signal counter is the whole group's, so a reader
                waiting on it sees the merge. merge = 0: ticket 0, no merge.
    ATTN_REDUCE merges the NS partials of q heads g*G + head0 .. g*G + head0 + nheads - 1
                (inside kv group g), batch row b, into their columns of attn[l, b]
    OPROJ       resid[2l+1][:, r0:r0+n] = resid[2l][:, r0:r0+n] + attn[l] @ wo[l][r0:r0+n].T;
                copy = 1: the same values also into resid[2l+2] (the initial value that the
                K-sliced DOWNs add to)
    GATEUP      x = rmsnorm(resid[2l+1], mlp_norm[l]); y = x @ wgu[l][r0:r0+n].T;
                act[l][:, r0/2 : (r0+n)/2] = silu(y[:, 0::2]) * y[:, 1::2]
                copy > 0 (tp = 1, fold = 0; a plan with fuse_oproj and down_k_slices > 1):
                resid[2l+1][:, sum_col0 : sum_col0+sum_ncols] also into resid[2l+2] (the
                initial value of the layer's K-sliced DOWN adds) and, copy = 2, into
                resid[2l+3] (that of the next layer's ATTN_OPROJ adds and of this layer's
                DOWN adds with copy = 1); the stage's ranges cover [0, d) once
    DOWN        kn = 0: resid[2l+2][:, r0:r0+n] = resid[2l+1][:, r0:r0+n] + act[l] @
                wdown[l][r0:r0+n].T; copy = 1: the same values also into resid[2l+3] (as
                EMBED's copy). kn > 0 (plan option down_k_slices, tp = 1): the K slice
                [k0, k0 + kn) of I only,
                    resid[2l+2][:, r0:r0+n] += act[l][:, k0:k0+kn] @ wdown[l][r0:r0+n, k0:k0+kn].T
                as atomic fp32 adds (order unspecified) onto the copy of resid[2l+1] that the
                layer's OPROJ (copy = 1) or, with ATTN_OPROJ, GATEUP (copy > 0) stored there.
                copy = 1 (with ATTN_OPROJ, not the last layer): the same adds also onto
                resid[2l+3], where GATEUP's copy = 2 stored resid[2l+1] too, so that it holds
                resid[2l+2] when the next layer's ATTN_OPROJ adds to it. k0 and kn are
                multiples of DOWN_K_ALIGN (whole activation vectors and 16-byte weight copies).
    LMHEAD      x = rmsnorm(resid[2L], final_norm); logits[:, r0:r0+n] = x @ lm_head[r0:r0+n].T;
                amax_val/idx[b, slot] = max and its lowest index over this slice
    ARGMAX      out_tokens[b] = index of the max over the NLM partials (lowest index on ties)
    RESID_SUM   (tp > 1) with m = after_mlp (0/1): resid[2l+1+m][:, r0:r0+n] =
                resid[2l+m][:, r0:r0+n] + part[2l+m][0][:, r0:r0+n] + ... + part[2l+m][TP-1][...]
                (summed in that order, so every rank computes the same bits)
    ATTN_OPROJ  (plan option fuse_oproj, tp = 1: ATTN_REDUCE and OPROJ in one stage) for every
                b: m[b, j] = the merge of the NS partials of q head `head`, dims dim0 + j
                (0 <= j < ndims; dim0 and ndims multiples of 4, the kernel's vector), as
                ATTN_REDUCE merges them; then, for the columns c in [col0, col0 + ncols),
                    resid[2l+1][b, c] += sum_j m[b, j] * wo[l][c, head*D + dim0 + j]
                as atomic fp32 adds (order unspecified) onto the copy of resid[2l] that the
                previous DOWN (EMBED for layer 0) stored there, or, where the DOWNs are
                K-sliced, the previous GATEUP's copy = 2 plus the previous DOWN's adds. The
                kernel reads the O projection transposed, wo_t [L, H*D, d] (row head*D +
                dim0 + j, columns col0 ..). col0 is a multiple of 4, ncols of 8 (the kernel's
                8 columns per thread; a slice narrower than 2048 columns shares its rows
                among groups of threads). attn[l] is not written.
layer is -1 for EMBED, LMHEAD and ARGMAX.

Kernel capacity (the scheduler respects these; the generated header static_asserts them):
    a matvec instruction's n * B <= MAX_ROWS_TIMES_BATCH (fp32 accumulators in shared memory).
"""
from __future__ import annotations

import enum
import sys
from pathlib import Path

WORDS = 16
MAX_BATCH = 16
MAX_ROWS_TIMES_BATCH = 8192
DOWN_K_ALIGN = 64   # a K-sliced DOWN's k0 and kn are multiples of this


class Err(enum.IntEnum):
    """Codes of the kernel's error record error[8] = [code, sm, queue index, uid, counter,
    value, needed value, opcode]; the first error wins and stops every block."""
    NONE = 0
    WATCHDOG = 1         # a counter wait exceeded its budget
    BAD_OPCODE = 2       # unknown opcode in a queue
    BAD_TOKEN = 3        # token id out of range
    BAD_POSITION = 4     # position outside [0, S)
    ABORTED = 5          # stopped because another block reported an error
    BAD_INSTRUCTION = 6  # fields outside what the kernel supports (rows * B too large, odd pairs)


class Op(enum.IntEnum):
    NOP = 0
    EMBED = 1
    QKV = 2
    ATTN = 3
    ATTN_REDUCE = 4
    OPROJ = 5
    GATEUP = 6
    DOWN = 7
    LMHEAD = 8
    ARGMAX = 9
    RESID_SUM = 10
    ATTN_OPROJ = 11


# Common words, in order.
HEADER = ("opcode", "layer", "uid", "wait0_first", "wait0_count", "wait1_first", "wait1_count",
          "signal")
# Each opcode's own fields, starting at word len(HEADER).
ARGS: dict[Op, tuple[str, ...]] = {
    Op.NOP: (),
    Op.EMBED: ("col0", "ncols", "copy"),
    Op.QKV: ("row0", "nrows", "fold", "sum_col0", "sum_ncols"),
    Op.ATTN: ("b", "kv_head", "split", "merge", "ticket"),
    Op.ATTN_REDUCE: ("b", "kv_head", "head0", "nheads"),
    Op.OPROJ: ("row0", "nrows", "copy"),
    Op.GATEUP: ("row0", "nrows", "fold", "sum_col0", "sum_ncols", "copy"),
    Op.DOWN: ("row0", "nrows", "copy", "k0", "kn"),
    Op.LMHEAD: ("row0", "nrows", "slot", "fold", "sum_col0", "sum_ncols"),
    Op.ARGMAX: (),
    Op.RESID_SUM: ("row0", "nrows", "after_mlp"),
    Op.ATTN_OPROJ: ("head", "dim0", "ndims", "col0", "ncols"),
}
ALL_RANKS_WORD = WORDS - 1
MATVEC_OPS = (Op.QKV, Op.OPROJ, Op.GATEUP, Op.DOWN, Op.LMHEAD)
FOLD_OPS = (Op.QKV, Op.GATEUP, Op.LMHEAD)   # the readers of a residual level (fold, below)
OPTIONAL_FIELDS = ("fold", "sum_col0", "sum_ncols", "merge", "ticket", "copy", "k0",
                   "kn")   # encode() fills in 0
NUM_WAITS = 2

assert len(HEADER) + max(len(a) for a in ARGS.values()) <= ALL_RANKS_WORD


def word_index(op: Op, field: str) -> int:
    """Word index of `field` in a record of opcode `op` (common or op-specific)."""
    if field in HEADER:
        return HEADER.index(field)
    if field == "all_ranks":
        return ALL_RANKS_WORD
    try:
        return len(HEADER) + ARGS[Op(op)].index(field)
    except ValueError:
        raise KeyError(f"opcode {Op(op).name} has no field {field!r}; it has "
                       f"{HEADER + ARGS[Op(op)]}") from None


def encode(op: Op, layer: int = -1, uid: int = 0, waits=(), signal: int = -1, all_ranks=0,
           **fields):
    """One record as a list of WORDS ints. waits: up to NUM_WAITS (first, count) ranges."""
    op = Op(op)
    if len(waits) > NUM_WAITS:
        raise ValueError(f"{op.name}: {len(waits)} wait ranges, at most {NUM_WAITS}")
    missing = set(ARGS[op]) - set(fields) - set(OPTIONAL_FIELDS)
    extra = set(fields) - set(ARGS[op])
    if missing or extra:
        raise ValueError(f"{op.name}: missing fields {sorted(missing)}, unknown {sorted(extra)}")
    rec = [0] * WORDS
    rec[0], rec[1], rec[2], rec[7] = int(op), layer, uid, signal
    rec[ALL_RANKS_WORD] = int(all_ranks)
    for i, (first, count) in enumerate(waits):
        rec[3 + 2 * i], rec[4 + 2 * i] = first, count
    for name, value in fields.items():
        rec[word_index(op, name)] = int(value)
    return rec


def decode(rec) -> dict:
    """Record -> dict with 'op', the header fields and the opcode's fields."""
    op = Op(int(rec[0]))
    out = {"op": op}
    for i, name in enumerate(HEADER[1:], start=1):
        out[name] = int(rec[i])
    for name in ARGS[op]:
        out[name] = int(rec[word_index(op, name)])
    out["all_ranks"] = int(rec[ALL_RANKS_WORD])
    return out


HEADER_PATH = Path(__file__).resolve().parent.parent / "csrc" / "generated" / "isa.cuh"


def render_header() -> str:
    """The C++ header csrc/ includes, generated from this module."""
    lines = [
        "// GENERATED by scheduler/isa.py -- do not edit; run `python -m megakernel.scheduler.isa`.",
        "// Instruction record layout shared with the Python scheduler.",
        "#pragma once",
        "",
        "#ifdef __CUDACC__",
        "#define MK_HOST_DEVICE __host__ __device__",
        "#else",
        "#define MK_HOST_DEVICE",
        "#endif",
        "",
        "namespace mk {",
        "",
        f"constexpr int kWords = {WORDS};",
        f"constexpr int kMaxBatch = {MAX_BATCH};",
        f"constexpr int kMaxRowsTimesBatch = {MAX_ROWS_TIMES_BATCH};",
        f"constexpr int kDownKAlign = {DOWN_K_ALIGN};",
        f"constexpr int kNumWaits = {NUM_WAITS};",
        "",
        "enum Op : int {",
    ]
    lines += [f"  OP_{op.name} = {int(op)}," for op in Op]
    lines += ["};", "", "// Codes of the error record (scheduler/isa.py Err).", "enum ErrorCode : int {"]
    lines += [f"  ERR_{e.name} = {int(e)}," for e in Err]
    lines += ["};", "", "// Common words."]
    lines += [f"constexpr int W_{name.upper()} = {i};" for i, name in enumerate(HEADER)]
    lines.append(f"constexpr int W_ALL_RANKS = {ALL_RANKS_WORD};")
    for op in Op:
        if ARGS[op]:
            lines.append(f"// {op.name} fields.")
        for name in ARGS[op]:
            lines.append(f"constexpr int W_{op.name}_{name.upper()} = {word_index(op, name)};")
    lines += ["", "MK_HOST_DEVICE inline const char* op_name(int op) {", "  switch (op) {"]
    lines += [f'    case OP_{op.name}: return "{op.name}";' for op in Op]
    lines += ['    default: return "UNKNOWN";', "  }", "}", "", "}  // namespace mk", ""]
    return "\n".join(lines)


def write_header(path: Path = HEADER_PATH) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(render_header())
    return path


if __name__ == "__main__":
    print(write_header(Path(sys.argv[1]) if len(sys.argv) > 1 else HEADER_PATH))
