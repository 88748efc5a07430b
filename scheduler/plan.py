"""plan(): the scheduler's entry point. Checks the arguments, lowers the step (lowering.py),
prices every instruction (cost.py), assigns SMs (assign.py), encodes the per-SM queues and
the claim list (the records SMs claim at run time: policy "queue", option claim_tail;
program.py), validates the result (validate.py) and predicts the step time (simulate.py).
tp > 1 (sharding.py): every rank is lowered on the shard config; rank 0's costs pick one
order and SM assignment for all ranks (their stages and counters are identical), so uids
match across ranks; the result is a TpProgram of per-rank Programs.

Options (plan(..., name=value); Program.options holds them all, defaults filled in):
    slices          target slices per weight matrix (default num_sms: one wave per matrix)
    qkv_slices, oproj_slices, gateup_slices, down_slices, lmhead_slices   per-matrix targets
                    (default `slices`); a matvec slice never exceeds MAX_ROWS_TIMES_BATCH //
                    batch rows, so a target can be exceeded at large batch
    embed_slices    EMBED column slices (default min(slices, d // 256), at least 1)
    reduce_slices   target ATTN_REDUCE instructions (default `slices`): each (b, kv_head)
                    gets min(G, reduce_slices // (batch * Hkv)) of them, at least 1 (1: one
                    per kv group, the layout before the split)
    fuse_reduce     no ATTN_REDUCE stage: the last ATTN split of each (b, kv_head) to finish
                    merges the group's partials (isa.py ATTN merge; False)
    fuse_oproj      no ATTN_REDUCE or OPROJ stage: ATTN_OPROJ instructions, oproj_slices // H
                    (at least 1) per q head, each merge a dim slice's partials and add its O
                    projection of a column slice into the residual atomically (isa.py).
                    tp = 1, batch <= FUSE_OPROJ_MAX_BATCH (8), not with fuse_reduce; the
                    default (None) turns it on where those hold up to batch
                    FUSE_OPROJ_DEFAULT_MAX_BATCH (7; measured faster there on the H100:
                    batch 1 to 4 in session 16; 1B batch 5 / 6 / 7 by 3.2 / 5.4 / 0.8%, 8B
                    batch 5 by 1.8%, but 0.6-0.7% slower at 1B and 8B batch 8, session 18)
    oproj_col_slices  fuse_oproj: column slices per (q head, dim slice); 0 (default): the
                    most up to oproj_slices // H, a power of two of equal widths that are
                    multiples of 8 (lowering.oproj_column_slices): with oproj_slices = 4H a slice
                    covers a whole head and each residual element takes H adds; 1: every
                    instruction adds whole rows (oproj_slices // H dim slices per head)
    down_k_slices   K slices per DOWN row slice (1: whole rows). n > 1: DOWN rows in
                    down_slices // n row slices, each cut into n slices of I that add into
                    the residual atomically, onto a copy OPROJ (with fuse_oproj: GATEUP)
                    stores (isa.py), so an instruction stages 1/n of the MLP activation
                    (whole rows at batch 8: as many fp32 activation bytes as weight bytes
                    at 1B). tp = 1. The default (None): 1 where the plan runs under tp, I is
                    not a multiple of isa.DOWN_K_ALIGN or the plan fuses the O projection
                    at batch <= 4; else default_down_k_slices
                    (an instruction's activation bytes about 1/4 of its weight bytes, its
                    accumulator copies within the kernel's; measured best at 1B batch 5, 8
                    and 16 and 8B batch 8 and 16, bench/NOTES.md session 17). n > 1
                    makes the residual's sums order-nondeterministic, as ATTN_OPROJ's are
    claim_tail      "none" (default) or "lmhead": the step's tail, every LMHEAD and ARGMAX, is
                    claimed at run time (Program.claim: an idle SM takes the next with an
                    atomic) instead of queued on an SM by the policy; its instructions get
                    the last uids (they depend on everything before them). For rr, lpt and
                    dag; policy "queue" claims every instruction anyway. tp = 1
    kv_position     sequence position the cost model assumes for ATTN's KV reads (512)
    fold            tp > 1: the residual's readers sum the tp partials (True; the kernel
                    built with -DMK_FOLD=1, which Decoder adds), or RESID_SUM stages do
                    (False, the default: folding measured no faster, bench/NOTES.md)
    validate        run validate() on the plan (True); off only to time planning itself
"""
from __future__ import annotations

import math
import operator

import numpy as np

from megakernel.config import ModelConfig

from . import calibration, isa
from .assign import POLICIES, assign
from .cost import instruction_us
from .lowering import GRANULARITIES, SLICED_OPS, Lowered, Shard, lower
from .program import Program, TpProgram
from .sharding import check_tp, shard_config, vocab_rows
from .simulate import simulate
from .validate import validate

OPTIONS = ("slices", *(f"{op}_slices" for op in SLICED_OPS), "oproj_col_slices",
           "down_k_slices", "claim_tail", "kv_position", "fold", "fuse_reduce", "fuse_oproj",
           "validate")
BOOL_OPTIONS = {"fold": False, "fuse_reduce": False, "fuse_oproj": None,
                "validate": True}   # and their defaults (None: decided by plan())
FUSE_OPROJ_MAX_BATCH = 8   # ATTN_OPROJ keeps a batch row's sums in registers
FUSE_OPROJ_DEFAULT_MAX_BATCH = 7   # fuse_oproj's default: on up to this batch
WHOLE_DOWN_MAX_BATCH = 4   # fused plans up to this batch keep whole DOWN rows by default
CLAIM_TAILS = {"none": (), "lmhead": (isa.Op.LMHEAD, isa.Op.ARGMAX)}   # -> the opcodes claimed


def parse_options(text: str) -> dict:
    """plan() keywords from "k=v,k2=v2" (command lines): the options above, attn_splits,
    num_sms, policy and granularity; True/False options take 1/0 or true/false."""
    words, ints = ("policy", "granularity", "claim_tail"), ("attn_splits", "num_sms")
    out = {}
    for item in filter(None, text.split(",")):
        key, sep, value = item.partition("=")
        if not sep or key not in OPTIONS + words + ints:
            raise ValueError(f"plan option {item!r}: expected k=v with k one of "
                             f"{list(dict.fromkeys(OPTIONS + words + ints))}")
        if key in words:
            out[key] = value
        elif key in BOOL_OPTIONS:
            if value.lower() not in ("0", "1", "true", "false"):
                raise ValueError(f"plan option {key} takes 0/1 or true/false, got {value!r}")
            out[key] = value.lower() in ("1", "true")
        else:
            try:
                out[key] = int(value)
            except ValueError:
                raise ValueError(f"plan option {key} takes an integer, got {value!r}") from None
    return out


def _int(name: str, value, lo: int, hi: int | None = None) -> int:
    try:
        if isinstance(value, bool):
            raise TypeError
        v = operator.index(value)
    except TypeError:
        v = None
    if v is None or v < lo or (hi is not None and v > hi):
        allowed = f"in {lo}..{hi}" if hi is not None else f">= {lo}"
        raise ValueError(f"{name} must be an int {allowed}, got {value!r}")
    return v


def _choice(name: str, value, allowed: tuple) -> str:
    if value not in allowed:
        raise ValueError(f"{name} must be one of {list(allowed)}, got {value!r}")
    return value


def _resolve_options(cfg: ModelConfig, num_sms: int, options: dict) -> dict:
    unknown = set(options) - set(OPTIONS)
    if unknown:
        raise ValueError(f"unknown plan options {sorted(unknown)}; options: {list(OPTIONS)}")
    out = {"slices": _int("slices", options.get("slices", num_sms), 1)}
    out["embed_slices"] = max(1, min(out["slices"], cfg.d // 256))
    for op in SLICED_OPS:
        key = f"{op}_slices"
        out[key] = _int(key, options.get(key, out.get(key, out["slices"])), 1)
    out["oproj_col_slices"] = _int("oproj_col_slices", options.get("oproj_col_slices", 0), 0)
    k = options.get("down_k_slices")
    out["down_k_slices"] = None if k is None else _int("down_k_slices", k, 1)
    out["claim_tail"] = _choice("claim_tail", options.get("claim_tail", "none"),
                                tuple(CLAIM_TAILS))
    out["kv_position"] = _int("kv_position", options.get("kv_position", 512), 0)
    for key, default in BOOL_OPTIONS.items():
        out[key] = options.get(key, default)
        if not isinstance(out[key], bool) and not (default is None and out[key] is None):
            allowed = "True, False or None (the default)" if default is None else "True or False"
            raise ValueError(f"{key} must be {allowed}, got {out[key]!r}")
    return out


def _resolve_fuse_oproj(tp: int, batch: int, opts: dict) -> bool:
    """The limits of ATTN_OPROJ: it adds into this GPU's own residual (there are no tp
    partials to sum), for at most FUSE_OPROJ_MAX_BATCH batch rows; it merges the partials
    itself. None (the default): on wherever they hold, up to FUSE_OPROJ_DEFAULT_MAX_BATCH;
    True where they do not hold: an error."""
    if opts["fuse_oproj"] is None:
        return (tp == 1 and batch <= FUSE_OPROJ_DEFAULT_MAX_BATCH and not opts["fuse_reduce"])
    if opts["fuse_oproj"]:
        if tp > 1:
            raise ValueError(f"fuse_oproj needs tp=1, got tp={tp}")
        if batch > FUSE_OPROJ_MAX_BATCH:
            raise ValueError(f"fuse_oproj supports batch <= {FUSE_OPROJ_MAX_BATCH}, got "
                             f"batch={batch}")
        if opts["fuse_reduce"]:
            raise ValueError("fuse_oproj and fuse_reduce exclude each other: ATTN_OPROJ "
                             "merges the partials itself")
    return opts["fuse_oproj"]


def default_down_k_slices(cfg: ModelConfig, batch: int, num_sms: int) -> int:
    """The power of two n nearest 8 * num_sms * batch / d: a DOWN of ~d * n / num_sms rows
    and I / n columns then stages batch * I / n fp32 activations, about a quarter of its
    weight bytes; halved while 8 copies of its accumulators (rows * batch floats each) would
    not fit the kernel's MAX_ROWS_TIMES_BATCH, where the tensor-core matvec falls back from
    per-warp copies to shared atomics (MK_TC_WARP_ACC). Measured best on the H100 (bench/
    NOTES.md, session 17): 1B batch 5 / 8 / 16: 2 / 4 / 4, 8B batch 8 / 16: 2 / 2."""
    n = 2 ** round(math.log2(max(1.0, 8 * num_sms * batch / cfg.d)))
    n = min(n, cfg.I // isa.DOWN_K_ALIGN)
    while n > 1 and 8 * -(-cfg.d * n // num_sms) * batch > isa.MAX_ROWS_TIMES_BATCH:
        n //= 2
    return int(n)


def _resolve_down_k_slices(cfg: ModelConfig, batch: int, num_sms: int, tp: int,
                           opts: dict) -> int:
    n = opts["down_k_slices"]
    if n is None:
        fused_small = opts["fuse_oproj"] and batch <= WHOLE_DOWN_MAX_BATCH
        plain = tp > 1 or fused_small or cfg.I % isa.DOWN_K_ALIGN
        return 1 if plain else default_down_k_slices(cfg, batch, num_sms)
    if n > 1 and tp > 1:
        raise ValueError(f"down_k_slices={n} needs tp=1 (its DOWNs add into this GPU's own "
                         f"residual), got tp={tp}")
    return n


def default_attn_splits(cfg: ModelConfig, batch: int, num_sms: int) -> int:
    """NS with batch * Hkv * NS about num_sms, in 1..32."""
    return int(np.clip(round(num_sms / (batch * cfg.Hkv)), 1, 32))


def plan(cfg, batch=1, num_sms=132, policy="dag", tp=1, granularity="chunk", attn_splits=None,
         gpu=None, **options) -> Program | TpProgram:
    """Plan one decode step of `cfg` (a ModelConfig or preset name) for `batch` sequences on
    `num_sms` SMs. gpu: GpuSpec, preset name, dict or JSON path for the cost model (h100)."""
    if isinstance(cfg, str):
        cfg = ModelConfig.preset(cfg)
    if not isinstance(cfg, ModelConfig):
        raise ValueError(f"cfg must be a ModelConfig or a preset name, got {type(cfg).__name__}")
    batch = _int("batch", batch, 1, isa.MAX_BATCH)
    num_sms = _int("num_sms", num_sms, 1)
    policy = _choice("policy", policy, POLICIES)
    granularity = _choice("granularity", granularity, GRANULARITIES)
    tp = _int("tp", tp, 1)
    check_tp(cfg, tp)
    full, cfg = cfg, shard_config(cfg, tp)
    attn_splits = default_attn_splits(cfg, batch, num_sms) if attn_splits is None \
        else _int("attn_splits", attn_splits, 1)
    spec = calibration.resolve(gpu)
    opts = _resolve_options(cfg, num_sms, options)
    if tp > 1 and (policy == "queue" or opts["claim_tail"] != "none"):
        raise ValueError(f"policy='queue' and claim_tail need tp=1 (the SMs of one GPU claim "
                         f"from its work queue), got tp={tp} with policy={policy!r}, "
                         f"claim_tail={opts['claim_tail']!r}")
    opts["fuse_oproj"] = _resolve_fuse_oproj(tp, batch, opts)
    opts["down_k_slices"] = _resolve_down_k_slices(cfg, batch, num_sms, tp, opts)

    slices = {op: opts[f"{op}_slices"] for op in SLICED_OPS}
    shards = [None] if tp == 1 else [Shard(tp, r, vocab_rows(cfg.V, tp)) for r in range(tp)]
    lows = [lower(cfg, batch, granularity, attn_splits, slices, s, opts["fold"],
                  opts["fuse_reduce"], opts["fuse_oproj"], opts["oproj_col_slices"],
                  opts["down_k_slices"])
            for s in shards]
    cost = instruction_us(lows[0].instrs, cfg, batch, attn_splits, lows[0].lm_slices, spec,
                          num_sms, opts["kv_position"], tp)
    order, sm = assign(lows[0], cost, policy, num_sms, spec.counter_latency_us)
    claimed = np.full(len(order), policy == "queue") | np.isin(
        lows[0].instrs.op, CLAIM_TAILS[opts["claim_tail"]])
    order = _claims_last(lows[0], order, claimed)
    programs = []
    for rank, low in enumerate(lows):
        instructions, queue_len, claim = _encode(low, order, sm, claimed, num_sms)
        programs.append(Program(
            config=cfg, batch=batch, num_sms=num_sms, tp=tp, policy=policy,
            granularity=granularity, attn_splits=attn_splits, lm_slices=low.lm_slices,
            instructions=instructions, queue_len=queue_len,
            counter_targets=low.counter_targets.astype(np.int32),
            num_counters=len(low.counter_targets), num_instructions=len(order), options=opts,
            predicted_us=0.0, gpu=spec, rank=rank, claim=claim))
    program = programs[0] if tp == 1 else TpProgram(full, tp, programs)
    if opts["validate"]:
        validate(program)
    for p in programs:
        p.predicted_us = simulate(p, spec).total_us
    return program


def _claims_last(low: Lowered, order: np.ndarray, claimed: np.ndarray) -> np.ndarray:
    """`order` with the claimed instructions (bool [N], lowering index) moved to its end,
    each part in its own order: an SM claims only after its whole static queue, so every
    claimed uid must follow every static one. That keeps the order topological unless a
    static instruction waits on a counter a claimed one signals: then ValueError."""
    ins = low.instrs
    signals = np.zeros(len(low.counter_targets), bool)
    signals[ins.signal[claimed & (ins.signal >= 0)]] = True
    prefix = np.r_[0, np.cumsum(signals)]
    first, count = ins.waits[:, 0::2], ins.waits[:, 1::2]
    waits = (prefix[first + count] - prefix[first] > 0).any(axis=1)
    bad = np.flatnonzero(~claimed & waits)
    if len(bad):
        i = int(bad[0])
        raise ValueError(f"cannot claim {int(claimed.sum())} instructions at run time after the "
                         f"static queues: {isa.Op(int(ins.op[i])).name} (layer "
                         f"{int(ins.layer[i])}) is not claimed but waits on a counter a claimed "
                         "instruction signals")
    return np.r_[order[~claimed[order]], order[claimed[order]]]


def _encode(low: Lowered, order: np.ndarray, sm: np.ndarray, claimed: np.ndarray,
            num_sms: int):
    """-> (instructions int32 [num_sms, max_len, WORDS], queue_len int32 [num_sms], claim
    int32 [claim_len, WORDS]): the static instructions in per-SM queues, the claimed ones
    (the end of `order`, _claims_last) in uid order."""
    N = len(order)
    uid = np.empty(N, np.int32)
    uid[order] = np.arange(N, dtype=np.int32)
    records = low.instrs.to_records(uid)
    static = np.flatnonzero(~claimed)
    queue_len = np.bincount(sm[static], minlength=num_sms).astype(np.int32)
    by_queue = static[np.lexsort((uid[static], sm[static]))]
    sm_sorted = sm[by_queue]
    index = np.arange(len(by_queue)) - (np.cumsum(queue_len) - queue_len)[sm_sorted]
    instructions = np.zeros((num_sms, max(1, int(queue_len.max())), isa.WORDS), np.int32)
    instructions[sm_sorted, index] = records[by_queue]
    return instructions, queue_len, records[order[len(static):]]
