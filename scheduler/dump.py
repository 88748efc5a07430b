"""`python -m megakernel plan`: plan a decode step and print a readable digest of it.

Prints the program summary, a table per opcode (instructions, bytes, predicted time), the
spread of work over SMs (claimed records on the SMs the simulator predicts take them), the
claim list (the records the SMs claim at run time: its opcodes and uids), the counters, and
the predicted step time against the HBM floor; summaries only, never one line per
instruction. --trace writes the predicted timeline as Chrome/Perfetto trace JSON (one track
per SM).
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

from megakernel.config import ModelConfig

from . import isa
from .assign import POLICIES
from .cost import instruction_bytes_flops
from .lowering import GRANULARITIES
from .plan import CLAIM_TAILS, plan
from .simulate import simulate
from .table import CLAIMED


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="llama-3.2-1b",
                        help="preset name or a Hugging Face directory / config.json")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--num-sms", type=int, default=132)
    parser.add_argument("--policy", choices=POLICIES, default="dag")
    parser.add_argument("--granularity", choices=GRANULARITIES, default="chunk")
    parser.add_argument("--attn-splits", type=int, default=None)
    parser.add_argument("--tp", type=int, default=1)
    parser.add_argument("--claim-tail", choices=tuple(CLAIM_TAILS), default="none",
                        help="claim the step's tail (LMHEAD, ARGMAX) at run time: lmhead")
    parser.add_argument("--slices", type=int, default=None,
                        help="target slices per weight matrix (default num_sms)")
    parser.add_argument("--kv-position", type=int, default=512,
                        help="sequence position the cost model assumes")
    parser.add_argument("--gpu", default="h100", help="cost-model preset or GpuSpec JSON file")
    parser.add_argument("--trace", type=Path, default=None,
                        help="write the predicted timeline as Chrome/Perfetto trace JSON")


def _config(model: str) -> ModelConfig:
    return ModelConfig.from_hf(model) if Path(model).exists() else ModelConfig.preset(model)


def main(args) -> int:
    options = {"kv_position": args.kv_position, "claim_tail": args.claim_tail}
    if args.slices is not None:
        options["slices"] = args.slices
    t0 = time.perf_counter()
    try:
        prog = plan(_config(args.model), batch=args.batch, num_sms=args.num_sms,
                    policy=args.policy, tp=args.tp, granularity=args.granularity,
                    attn_splits=args.attn_splits, gpu=args.gpu, **options)
    except (ValueError, NotImplementedError) as e:
        print(f"plan: {e}", file=sys.stderr)
        return 2
    planned_s = time.perf_counter() - t0
    if args.tp > 1:
        print(f"tp {args.tp}: rank 0 of {args.tp} shown (every rank runs the same stages)")
        prog = prog.ranks[0]
    timeline = simulate(prog)
    print(prog.summary())
    print(f"  planned and validated in {planned_s:.2f} s")
    print()
    print(_per_opcode(prog, timeline))
    print()
    print(_per_sm(prog, timeline))
    print()
    if prog.claim_len:
        print(_claims(prog, timeline))
        print()
    print(_counters(prog))
    print()
    weight_floor = prog.config.weight_bytes(prog.gpu.weight_bytes) / prog.gpu.hbm_bytes_per_s
    print(f"predicted step: {timeline.total_us:.1f} us on {prog.gpu.name}; weight-streaming "
          f"floor {weight_floor * 1e6:.1f} us ({weight_floor * 1e6 / timeline.total_us:.0%})")
    if args.trace is not None:
        print(f"trace: {timeline.to_chrome_trace(args.trace)}")
    return 0


def _per_opcode(prog, timeline) -> str:
    t = prog.table()
    t = t.take(np.argsort(t.uid))
    nbytes, flops = instruction_bytes_flops(t, prog.config, prog.batch, prog.attn_splits,
                                            prog.lm_slices, prog.gpu, prog.options["kv_position"],
                                            prog.tp)
    dur = timeline.end_us - timeline.start_us
    lines = [f"{'opcode':<12}{'count':>8}{'MB moved':>12}{'GFLOP':>10}{'SM-us':>12}"
             f"{'mean us':>10}"]
    for op in isa.Op:
        m = t.op == op
        if m.any():
            lines.append(f"{op.name:<12}{int(m.sum()):>8}{nbytes[m].sum() / 1e6:>12.2f}"
                         f"{flops[m].sum() / 1e9:>10.3f}{dur[m].sum():>12.1f}"
                         f"{dur[m].mean():>10.2f}")
    return "\n".join(lines)


def _per_sm(prog, timeline) -> str:
    busy = timeline.busy_us()
    q = np.bincount(timeline.sm, minlength=prog.num_sms)    # claims where predicted
    total = timeline.total_us

    def spread(x, fmt):
        return " / ".join(format(v, fmt) for v in (x.min(), np.median(x), x.mean(), x.max()))

    order = np.argsort(busy)
    return "\n".join([
        "per SM (min / median / mean / max):",
        f"  instructions  {spread(q, '.0f')}",
        f"  busy us       {spread(busy, '.1f')}",
        f"  idle share    {spread(1 - busy / total, '.1%')}",
        "  least busy SMs: " + ", ".join(f"{s} ({busy[s]:.0f} us)" for s in order[:3]),
        "  busiest SMs:    " + ", ".join(f"{s} ({busy[s]:.0f} us)" for s in order[::-1][:3]),
    ])


def _claims(prog, timeline) -> str:
    """The claim list: its length, uids, opcodes, and how many claims each SM is predicted
    to take (the simulator's: the SM free first takes the next)."""
    t = prog.table()
    claimed = t.take(np.flatnonzero(t.sm == CLAIMED))
    ops = ", ".join(f"{op.name} {int((claimed.op == op).sum())}" for op in isa.Op
                    if (claimed.op == op).any())
    taken = np.bincount(timeline.sm[timeline.uid >= prog.num_instructions - prog.claim_len],
                        minlength=prog.num_sms)
    return "\n".join([
        f"claim list: {prog.claim_len} records claimed at run time, uids "
        f"{int(claimed.uid[0])}..{int(claimed.uid[-1])}: {ops}",
        f"  predicted claims per SM: min {taken.min()}  median {np.median(taken):.0f}  "
        f"max {taken.max()}",
    ])


def _counters(prog) -> str:
    t = prog.table()
    counts = t.waits[:, 1::2].sum(axis=1)
    return "\n".join([
        f"counters: {prog.num_counters} int32, monotonic across steps (epoch e waits for "
        "target * (e + 1))",
        f"  signals per counter (target): min {prog.counter_targets.min()}  max "
        f"{prog.counter_targets.max()}  total {int(prog.counter_targets.sum())}",
        f"  counters waited per instruction: mean {counts.mean():.2f}  max {counts.max()}",
    ])
