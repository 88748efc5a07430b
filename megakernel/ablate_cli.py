"""`python -m megakernel ablate`: what each overlap mechanism buys. Runs the grid of
bench/ablate.py (each row changes one switch from the default) for one model and batch on
the same weights, cache contents and position, each row timed like the bench's megakernel
contender: its CUDA graph replayed, L2 flushed and the position reset between CUDA-event-
timed steps, median. Beside each time: the cost model's prediction for the row's Program
(planned with this GPU's calibration), the ratios to the default row, and the row's logits
against the default row's. Writes <out>/ablate_<model>_b<batch>_<gpu>_<time>.json, .md, .png.

The kernel builds the rows need (one per distinct build_flags) run at once in child
processes while the weights are made; a row whose build fails is skipped with a note.
Exit status: 2 for bad arguments or no GPU, 1 when the default row fails, else 0.
"""
from __future__ import annotations

import argparse
import gc
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from megakernel.bench import ablate

BUILD_TIMEOUT_S = 300
# A child process that builds (or finds in the JIT cache) the extension for argv's flags.
BUILD_CODE = ("import sys; from megakernel.runtime import load_extension; "
              "load_extension(build_flags=tuple(sys.argv[1:]))")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="llama-3.2-1b", help="preset")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--pos", type=int, default=512, help="position of the timed step: "
                        "attention reads positions 0..pos")
    parser.add_argument("--iters", type=int, default=100, help="timed steps per row")
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--rows", default=None, help="comma list of row names to run (default "
                        "all; the default row always runs). Rows: " +
                        ",".join(r.name for r in ablate.grid()))
    parser.add_argument("--out", type=Path, default=Path("bench/results"))


def _checked(args):
    from megakernel import ModelConfig
    from megakernel.runtime import check_supported
    cfg = ModelConfig.preset(args.model)
    check_supported(cfg, args.batch)
    for name, v, lo in (("--pos", args.pos, 0), ("--iters", args.iters, 1),
                        ("--warmup", args.warmup, 0)):
        if v < lo:
            raise ValueError(f"{name} must be >= {lo}, got {v}")
    ablate.select(ablate.grid(), args.rows)       # names checked before any GPU work
    return cfg


def main(args) -> int:
    try:
        cfg = _checked(args)
        from megakernel.bench.harness import require_gpu
        device = require_gpu("python -m megakernel ablate")
    except (ValueError, RuntimeError) as e:
        print(f"ablate: {e}", file=sys.stderr)
        return 2
    from megakernel.bench.harness import Progress
    from megakernel.scheduler.calibration import slug
    log = Progress("ablate")
    run = ablate.derive(run_grid(cfg, args, device, log))
    stem = (f"ablate_{slug(cfg.name)}_b{args.batch}_{slug(run['gpu'])}_"
            f"{time.strftime('%Y%m%d-%H%M%S')}")
    paths, why = ablate.write_all(run, args.out, stem)
    print(ablate.markdown(run))
    for p in paths:
        log(f"wrote {p}")
    if why:
        log(why)
    default = run["records"][0]
    if default["ms_per_step"] is None:
        log(f"default row FAILED: {default['note']}")
        return 1
    return 0


class Builds:
    """One child process per distinct flag set, all started at once; the parent's own
    Runtime then finds each build in the JIT cache (keyed by sources and flags)."""

    def __init__(self, flag_sets, log):
        import megakernel
        env = dict(os.environ)
        root = str(Path(megakernel.__file__).resolve().parent.parent)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
        self.log, self.t0, self.procs, self.done = log, time.perf_counter(), {}, {}
        for flags in dict.fromkeys(flag_sets):
            err = tempfile.TemporaryFile(mode="w+")
            proc = subprocess.Popen([sys.executable, "-c", BUILD_CODE, *flags], env=env,
                                    stdout=subprocess.DEVNULL, stderr=err,
                                    start_new_session=True)
            self.procs[flags] = (proc, err)
        log(f"building {len(self.procs)} kernel variant(s) in child processes "
            "(~35 s each where not cached, all at once)")

    def wait(self, flags: tuple) -> str:
        """'' once the build of `flags` is in the cache, else why not (logged)."""
        if flags not in self.done:
            proc, err = self.procs[flags]
            left = BUILD_TIMEOUT_S - (time.perf_counter() - self.t0)
            try:
                rc = proc.wait(timeout=max(left, 1))
                err.seek(0)
                lines = err.read().strip().splitlines()
                note = "" if rc == 0 else (f"build failed (exit {rc}): "
                                           f"{(lines or ['no output'])[-1][:200]}")
                if rc:
                    print("\n".join(f"  build: {line}" for line in lines[-15:]), file=sys.stderr)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
                note = f"build not done within {BUILD_TIMEOUT_S} s (killed)"
            err.close()
            self.done[flags] = note
            what = " ".join(flags) or "default flags"
            self.log(f"build ({what}): {note or 'ready'}")
        return self.done[flags]


def run_grid(cfg, args, device, log) -> dict:
    import torch

    from megakernel import Weights
    from megakernel.bench import harness
    from megakernel.scheduler import calibration
    props = torch.cuda.get_device_properties(device)
    rows = ablate.select(ablate.grid(props.multi_processor_count), args.rows)
    builds = Builds([ablate.runtime_kwargs(r).get("build_flags", ()) for r in rows], log)
    spec = calibration.for_device(props.name)
    copy, _ = harness.bandwidth(device)
    flush = harness.L2Flush(device)
    w = Weights.random(cfg, seed=0, dtype=torch.bfloat16, device=device)
    inputs = harness.seeded_inputs(cfg, args.batch, args.pos, device)
    weights, kv = harness.bytes_read(cfg, args.batch, args.pos)
    run = {"schema": ablate.SCHEMA, **harness.stamp(device), "model": cfg.name,
           "batch": args.batch, "position": args.pos, "iters": args.iters,
           "warmup": args.warmup, "copy_TBps": copy / 1e12, "cost_model": spec.name,
           "bytes_read_per_step": weights + kv, "method": method(args), "notes": [],
           "records": []}
    log(f"copy bandwidth {copy / 1e12:.2f} TB/s; cost model {spec.name}; {len(rows)} rows")
    run["records"] = run_rows(rows, cfg, w, inputs, args, builds, spec,
                              props.multi_processor_count, flush, log)
    return run


def run_rows(rows, cfg, w, inputs, args, builds, spec, num_sms, flush, log) -> list[dict]:
    """One record per row; a row that fails or whose build failed gets a note, the rest go on."""
    import torch
    out, ref_logits = [], None
    for i, row in enumerate(rows):
        rec = ablate.record(row)
        try:
            note = builds.wait(ablate.runtime_kwargs(row).get("build_flags", ()))
            program = ablate.plan_row(row, cfg, args.batch, args.pos, num_sms, spec)
            rec["predicted_ms"] = program.predicted_us / 1e3
            rec["ring_ms"] = ablate.ring_ms(row, program, args.batch)
            if note:
                rec["note"] = f"skipped: {note}"
            else:
                measured = time_row(row, program, cfg, w, inputs, args, flush, ref_logits)
                logits = measured.pop("logits")
                ref_logits = logits if row.name == ablate.BASELINE else ref_logits
                rec.update(measured)
        except Exception as e:  # noqa: BLE001 -- one row failing must not end the grid
            rec["note"] = f"failed: {type(e).__name__}: {(str(e).splitlines() or [''])[0]}"[:300]
        finally:
            gc.collect()                  # the row's decoder, graphs and buffers
            torch.cuda.empty_cache()
        ms = "-" if rec["ms_per_step"] is None else f"{rec['ms_per_step']:.3f} ms/step"
        pred = "-" if rec["predicted_ms"] is None else f"{rec['predicted_ms']:.3f}"
        log(f"row {i + 1}/{len(rows)} {row.name}: {ms}, predicted {pred} ms {rec['note']}")
        out.append(rec)
    return out


def time_row(row, program, cfg, w, inputs, args, flush, ref_logits) -> dict:
    """Time one row; -> measured record fields and `logits` of one step at pos."""
    import torch

    from megakernel.bench import baselines, harness
    tokens, k, v = inputs
    t0 = time.perf_counter()
    dec, step, before = baselines.megakernel(cfg, w, args.batch, args.pos, tokens, k, v,
                                             program=program,
                                             **ablate.runtime_kwargs(row))
    setup_s = time.perf_counter() - t0
    if row.diagnostic:        # its greedy tokens are garbage: replay fixed ones instead
        graph = dec.capture(tokens)
        step = graph.replay
    ms = harness.time_steps(step, args.iters, args.warmup, before=lambda: (flush(), before()))
    dec.runtime.check()
    out = {**harness.summarize(ms), "setup_s": setup_s, "logits": None}
    if not row.diagnostic:
        dec.buffers.pos.fill_(args.pos)
        dec.launch_step(tokens)
        dec.runtime.check()
        out["logits"] = logits = dec.buffers.logits.clone()
        if ref_logits is not None:
            err = (logits - ref_logits).abs().max() / ref_logits.abs().max()
            out["logits_rel_diff"] = err.item()
            out["argmax_equal"] = bool(torch.equal(logits.argmax(-1), ref_logits.argmax(-1)))
    return out


def method(args) -> list[str]:
    return [
        "Every row on the same weights (Weights.random seed 0, bf16) and inputs: the KV "
        f"cache of positions 0..{args.pos - 1} seeded with the same random values, the same "
        "tokens; each step reads positions 0..pos and writes pos.",
        f"Timing as the bench's megakernel contender: Decoder.capture() replayed, {args.warmup} "
        f"warm-up steps, then CUDA events around each of {args.iters} steps; between steps "
        "(untimed) an L2 flush (a write of twice the L2) and the position reset. Median "
        "reported. Diagnostic rows replay a graph of fixed tokens instead of the greedy "
        "feedback.",
        "Each row is planned here with the GPU's calibration (calibration.for_device) and "
        "kv_position = the timed position; predicted_ms is that Program's simulated step. "
        "ablate/build_flags rows change the kernel, not the plan.",
        "logits vs default: max |logit - default row's logit| / max |default row's logit| "
        "of one step at the timed position, and whether the greedy tokens agree.",
    ]
