"""`python -m megakernel bench`: the megakernel against eager PyTorch, its CUDA graph and
torch.compile, on the same weights and positions, in one process (torch.compile in a child
with a deadline, bench/baselines.py says why). Writes <out>/bench_<gpu>_<time>.json, .md and
.png (bench/report.py); progress on stderr, the markdown table on stdout. Exit status 1 when
a megakernel contender failed or its logits failed the fp32 spot check.
"""
from __future__ import annotations

import argparse
import gc
import sys
import time
from pathlib import Path

CONTENDERS = ("eager", "cuda_graph", "compile", "megakernel")
COMPILE_MIN_S = 30      # a compile child gets at least this long, or is skipped
REPORT_RESERVE_S = 10   # kept from --time-limit for writing the results


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", action="append", help="preset; repeat for several "
                        "(default llama-3.2-1b)")
    parser.add_argument("--batch", type=int, action="append", help="repeat for several (1)")
    parser.add_argument("--pos", type=int, default=512, help="position of the timed step: "
                        "attention reads positions 0..pos")
    parser.add_argument("--iters", type=int, default=100, help="timed steps per contender")
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--contenders", default=",".join(CONTENDERS),
                        help=f"comma-separated subset of {','.join(CONTENDERS)}")
    parser.add_argument("--compile-timeout", type=float, default=120.0,
                        help="seconds per torch.compile child (compile + timing)")
    parser.add_argument("--time-limit", type=float, default=None,
                        help="seconds for the whole run; compile children get what is left")
    parser.add_argument("--out", type=Path, default=Path("bench/results"))
    parser.add_argument("--tp", type=int, default=1, help="tensor parallelism over this many "
                        "GPUs (bench/tp_bench.py: NCCL PyTorch eager and CUDA graph, the "
                        "megakernel, and the NCCL-between-launches and fold ablations)")
    parser.add_argument("--variants",
                        default="eager,cuda_graph,megakernel,megakernel_nccl,megakernel_fold",
                        help="with --tp > 1: comma-separated subset of those five, "
                        "megakernel_reduce1 (planned with reduce_slices=1) and "
                        "megakernel_fused (planned with fuse_reduce=True)")
    parser.add_argument("--graph-timeout", type=float, default=180.0,
                        help="with --tp > 1: seconds for the cuda_graph child of each shape")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--replot", type=Path, default=None, metavar="JSON",
                        help="only rewrite the markdown and PNG of a results JSON")


def _checked(args):
    from megakernel import ModelConfig
    cfgs = [ModelConfig.preset(m) for m in args.model or ["llama-3.2-1b"]]
    batches = args.batch or [1]
    contenders = [c.strip() for c in args.contenders.split(",") if c.strip()]
    unknown = sorted(set(contenders) - set(CONTENDERS))
    if unknown or not contenders:
        raise ValueError(f"--contenders {args.contenders!r}: choose from {','.join(CONTENDERS)}")
    if args.tp > 1:
        from megakernel.bench.tp_bench import VARIANTS
        args.variants = [c.strip() for c in args.variants.split(",") if c.strip()]
        if not args.variants or set(args.variants) - set(VARIANTS):
            raise ValueError(f"--variants: choose from {','.join(VARIANTS)}")
    for name, v, lo in (("--batch", min(batches), 1), ("--tp", args.tp, 1), ("--pos", args.pos, 0),
                        ("--iters", args.iters, 1), ("--warmup", args.warmup, 0)):
        if v < lo:
            raise ValueError(f"{name} must be >= {lo}, got {v}")
    return cfgs, batches, contenders


def main(args) -> int:
    from megakernel.bench import report
    if args.replot is not None:
        import json
        run = report.derive(json.loads(args.replot.read_text()))
        paths, why = report.write_all(run, args.replot.parent, args.replot.stem)
        print("\n".join(str(p) for p in paths) + (f"\n{why}" if why else ""))
        return 0 if why is None else 1
    try:
        cfgs, batches, contenders = _checked(args)
        from megakernel.bench.harness import require_gpu
        device = require_gpu("python -m megakernel bench")
    except (ValueError, RuntimeError) as e:
        print(f"bench: {e}", file=sys.stderr)
        return 2
    from megakernel.bench.harness import Progress
    from megakernel.scheduler.calibration import slug
    log = Progress("bench")
    if args.tp > 1:
        from megakernel.bench.tp_bench import run_tp
        import json

        import torch
        gpu = torch.cuda.get_device_name(device)
        stem = f"bench_{slug(gpu)}_tp{args.tp}_{time.strftime('%Y%m%d-%H%M%S')}"
        if args.child:      # the parent reads the records from the last stdout line
            run = run_tp(cfgs, batches, args.tp, args, log)
            print(json.dumps(run["records"]))
            return 0

        def save(partial):  # a later hang or kill keeps what was measured
            report.write_json(report.derive(partial), args.out / f"{stem}.partial.json")
        args.out.mkdir(parents=True, exist_ok=True)
        run = report.derive(run_tp(cfgs, batches, args.tp, args, log, on_record=save))
        (args.out / f"{stem}.partial.json").unlink(missing_ok=True)
    else:
        run = report.derive(run_bench(cfgs, batches, contenders, args, device, log))
        stem = f"bench_{slug(run['gpu'])}_{time.strftime('%Y%m%d-%H%M%S')}"
    paths, why = report.write_all(run, args.out, stem)
    print(report.markdown(run))
    for p in paths:
        log(f"wrote {p}")
    if why:
        log(why)
    bad = [f"{r['model']} batch {r['batch']}: {r['note'] or 'check: logits off'}"
           for r in run["records"] if r["contender"].startswith("megakernel")
           and (r["ms_per_step"] is None or (r.get("check") or {}).get("ok") is False)]
    for line in bad:
        log(f"megakernel FAILED {line}")
    return 1 if bad else 0


def run_bench(cfgs, batches, contenders, args, device, log) -> dict:
    import torch

    from megakernel import Weights
    from megakernel.bench import harness
    from megakernel.profiling import nvtx_range
    copy, read = harness.bandwidth(device)
    log(f"copy bandwidth {copy / 1e12:.2f} TB/s (read + write), read {read / 1e12:.2f} TB/s")
    flush = harness.L2Flush(device)
    run = {"schema": "megakernel-bench/1", **harness.stamp(device), "position": args.pos,
           "iters": args.iters, "warmup": args.warmup, "copy_TBps": copy / 1e12,
           "read_TBps": read / 1e12, "method": method(args, flush), "notes": [], "records": []}
    sums = {}
    for cfg in cfgs:
        try:
            with nvtx_range("bench.weights"):
                w = Weights.random(cfg, seed=0, dtype=torch.bfloat16, device=device)
            sums[cfg.name] = harness.fingerprint(w)
            for batch in batches:
                run["records"] += bench_shape(cfg, w, batch, contenders, args, device, flush,
                                              log)
                gc.collect()              # the shape's graphs, decoder and caches
                torch.cuda.empty_cache()
        except Exception as e:  # noqa: BLE001 -- keep what was measured, go on
            run["notes"].append(f"{cfg.name}: stopped early: {type(e).__name__}: {e}"[:300])
            log(run["notes"][-1])
        w = None
        gc.collect()
        torch.cuda.empty_cache()
    if "compile" in contenders:
        deadline = None if args.time_limit is None else args.time_limit - REPORT_RESERVE_S
        for cfg in cfgs:
            for batch in batches:
                run["records"].append(compile_record(cfg, batch, args, deadline, sums, log))
    return run


def _record(cfg, batch, pos, contender, ms=None, note="", **extra) -> dict:
    from megakernel.bench.harness import bytes_read, summarize
    weights, kv = bytes_read(cfg, batch, pos)
    timing = summarize(ms) if ms else {"ms_per_step": None}
    return {"model": cfg.name, "batch": batch, "tp": 1, "contender": contender, **timing,
            "bytes_read_per_step": weights + kv, "weight_bytes": weights, "kv_bytes": kv,
            "note": note, **extra}


def bench_shape(cfg, w, batch, contenders, args, device, flush, log) -> list[dict]:
    """eager, cuda_graph and megakernel records of one (model, batch)."""
    import torch

    from megakernel import ReferenceModel
    from megakernel.bench import harness
    from megakernel.profiling import nvtx_range
    tokens, k, v = harness.seeded_inputs(cfg, batch, args.pos, device)
    ref = ReferenceModel(cfg, w, batch=batch, max_seq=args.pos + 1)
    harness.seed_cache(ref.cache.k, ref.cache.v, k, v)
    inputs = (cfg, w, ref, tokens, torch.tensor([args.pos], device=device), k, v)
    out = []
    for name in (c for c in CONTENDERS if c in contenders and c != "compile"):
        try:
            with nvtx_range(f"bench.{name}"):
                ms, extra = _time(name, inputs, args, flush)
            out.append(_record(cfg, batch, args.pos, name, ms, **extra))
            log(f"{cfg.name} batch {batch} {name}: {out[-1]['ms_per_step']:.3f} ms/step")
        except Exception as e:  # noqa: BLE001 -- one contender failing must not end the run
            msg = f"failed: {type(e).__name__}: {(str(e).splitlines() or [''])[0]}"[:300]
            out.append(_record(cfg, batch, args.pos, name, note=msg))
            log(f"{cfg.name} batch {batch} {name}: {msg}")
    return out


def _time(name, inputs, args, flush):
    """-> (ms of each timed step, extra record fields) of one contender."""
    from megakernel.bench import baselines, harness
    cfg, w, ref, tokens, pos_t, k, v = inputs

    def timed(step, before=None):
        return harness.time_steps(step, args.iters, args.warmup,
                                  before=flush if before is None else lambda: (flush(), before()))

    if name == "eager":
        return timed(baselines.eager(ref, tokens, pos_t)), {}
    if name == "cuda_graph":
        graph, step = baselines.cuda_graph(ref, tokens, pos_t)
        return timed(step), {}
    t0 = time.perf_counter()
    dec, step, before = baselines.megakernel(cfg, w, tokens.shape[0], args.pos, tokens, k, v)
    setup_s = time.perf_counter() - t0
    ms = timed(step, before)
    dec.runtime.check()
    try:
        check = baselines.logit_errors(cfg, w, dec, ref, tokens, args.pos, k, v)
    except Exception as e:  # noqa: BLE001 -- the timing stands without the check
        check = {"ok": None, "note": f"failed: {type(e).__name__}: {e}"[:300]}
    return ms, dict(policy=dec.program.policy, setup_s=setup_s,
                    predicted_ms=dec.program.predicted_us / 1e3, check=check)


def compile_record(cfg, batch, args, deadline, sums, log) -> dict:
    from megakernel.bench import baselines
    timeout = args.compile_timeout
    if deadline is not None:
        timeout = min(timeout, deadline - log.elapsed())
        if timeout < COMPILE_MIN_S:
            return _record(cfg, batch, args.pos, "compile", note=f"skipped: {timeout:.0f} s "
                           f"left of --time-limit {args.time_limit:.0f} s")
    log(f"{cfg.name} batch {batch} compile: child process, deadline {timeout:.0f} s")
    res, note = baselines.compile_child(cfg.name, batch, args.pos, args.iters, args.warmup,
                                        timeout)
    if res is None:
        log(f"{cfg.name} batch {batch} compile: {note}")
        return _record(cfg, batch, args.pos, "compile", note=note)
    note = (f"compiled in {res['compile_s']:.0f} s (child process); max rel. logit diff vs "
            f"eager {res['rel_diff_vs_eager']:.1e}")
    if res["fingerprint"] != sums.get(cfg.name, res["fingerprint"]):
        note += "; WEIGHTS DIFFER from the parent's (checksum)"
    rec = _record(cfg, batch, args.pos, "compile", res["ms"], note=note)
    log(f"{cfg.name} batch {batch} compile: {rec['ms_per_step']:.3f} ms/step; {note}")
    return rec


def method(args, flush) -> list[str]:
    l2_mb = flush.buf.numel() * 4 / 2 / 1e6
    return [
        "Every contender runs on the same weights (Weights.random seed 0, bf16) and inputs: "
        f"the KV cache of positions 0..{args.pos - 1} seeded with the same random values; "
        f"each step reads positions 0..{args.pos} and writes {args.pos}.",
        f"Timing: {args.warmup} warm-up steps, then CUDA events around each of {args.iters} "
        f"steps only; between steps (untimed) a {2 * l2_mb:.0f} MB write, twice the "
        f"{l2_mb:.0f} MB L2, evicts what the step left there (the weights alone are far larger "
        "than L2). Median reported.",
        "bytes_read_per_step: every weight once (of the embedding only the batch's rows) + K "
        "and V of the positions read, bf16. achieved_TBps = bytes / median time; "
        "fraction_of_copy_bandwidth is of the 2 GiB device-to-device copy measured in this "
        "run (read + write counted).",
        "eager: ReferenceModel.forward in bf16 (gpt-fast style, position as a device tensor) "
        "called from Python; cuda_graph: the same captured once and replayed; compile: "
        "torch.compile(mode='reduce-overhead') in a child process with a "
        f"{args.compile_timeout:.0f} s deadline (the same weights rebuilt from the seed, "
        "checksum compared); megakernel: Decoder.capture() replayed with the position reset "
        "before every step.",
        "Megakernel correctness: one step against an fp32 ReferenceModel on the same cache, "
        "skipped where an fp32 copy of the weights does not fit in free device memory.",
    ]
