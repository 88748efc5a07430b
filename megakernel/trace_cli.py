"""`python -m megakernel trace`: one megakernel step with per-instruction timing.

On the GPU: plans once, times graph replays of that program with timing off and on (the
overhead), keeps the last traced step in <out>/trace.npz, then reports. The report (also
offline from a kept trace: --from-npz, CPU is enough) writes <out>/trace.json (Perfetto /
chrome://tracing, one track per SM) and <out>/gantt.png and prints the per-opcode table of
measured against predicted time and the predicted against measured step. --calibrate fits
the cost model's constants to the trace (scheduler/calibration.py), saves them as
<calibration-dir>/<gpu>.json, reports the prediction with them, and on the GPU re-plans with
them and traces that program too: the out-of-sample check of the calibration.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path


PHASE_FLAG = "-DMK_PHASE_STAMPS=1"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from megakernel.scheduler.calibration import CALIBRATION_DIR
    parser.add_argument("--model", default="llama-3.2-1b", help="preset")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--pos", type=int, default=512, help="position of the traced step")
    parser.add_argument("--policy", default="dag")
    parser.add_argument("--granularity", default="chunk")
    parser.add_argument("--iters", type=int, default=50, help="timed replays, timing off/on")
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--out", type=Path, required=True, help="directory for the outputs")
    parser.add_argument("--build-flag", action="append", default=[], metavar="-DMK_...=N",
                        help="kernel build flag (repeat), e.g. -DMK_INPUT_PREFETCH=0 for a "
                        "trace with one mechanism off")
    parser.add_argument("--set", default="", metavar="K=V,...",
                        help="plan options of the traced program, e.g. fuse_reduce=1")
    parser.add_argument("--ablate", action="append", default=[], metavar="SWITCH",
                        help="runtime switch (repeat): no_prefetch, or the diagnostics "
                        "no_compute / no_load (wrong results, timing only)")
    parser.add_argument("--phases", action="store_true",
                        help="build with -DMK_PHASE_STAMPS=1: ops stamp points inside each "
                        "instruction (staging, first/last page, ...); adds a phase table")
    parser.add_argument("--calibrate", action="store_true",
                        help="fit the cost model to the trace and save it for this GPU")
    parser.add_argument("--calibration-dir", type=Path, default=CALIBRATION_DIR)
    parser.add_argument("--from-npz", type=Path, default=None, metavar="NPZ",
                        help="report a kept trace.npz instead of running (no GPU needed); "
                        "for a bare timing dump the plan arguments above say what was traced")
    parser.add_argument("--device", default="unknown GPU",
                        help="GPU of a bare timing dump (names its calibration file)")


def main(args) -> int:
    try:
        if args.from_npz is not None:
            program, timing, meta = offline(args.from_npz, args)
            from megakernel.bench.trace import load_pages, load_phases
            pages, phases, gpu = load_pages(args.from_npz), load_phases(args.from_npz), None
        else:
            from megakernel.bench.harness import require_gpu
            gpu = Traced(args, require_gpu("python -m megakernel trace"))
            program, timing, meta = gpu.trace_planned()
            pages, phases = gpu.pages, gpu.phases
        args.out.mkdir(parents=True, exist_ok=True)
        report(program, timing, meta, args, gpu, pages, phases)
    except (ValueError, RuntimeError) as e:
        print(f"trace: {e}", file=sys.stderr)
        return 2
    return 0


def offline(path: Path, args):
    """(program, timing, meta) of a kept trace; the program is re-planned from its meta (a
    bare dump, e.g. bench/diagnose.py's, from the command's plan arguments)."""
    import numpy as np

    from megakernel.bench.trace import load_npz
    from megakernel.scheduler import plan
    from megakernel.scheduler.plan import parse_options
    timing, instructions, queue_len, meta = load_npz(path)
    if meta is None:
        meta = dict(model=args.model, batch=args.batch, pos=args.pos, policy=args.policy,
                    granularity=args.granularity, num_sms=int(timing.shape[0]), gpu_spec=None,
                    device=args.device, ms_timing_off=None, ms_timing_on=None,
                    commit="unknown", date="unknown", options=parse_options(args.set))
    program = plan(meta["model"], batch=meta["batch"], num_sms=meta["num_sms"],
                   policy=meta["policy"], granularity=meta["granularity"],
                   gpu=meta["gpu_spec"], kv_position=meta["pos"], **meta.get("options", {}))
    if program.claim_len:   # kept as executed: each SM's claims follow its static queue
        program = program.as_executed(_claims_of(program, instructions, queue_len))
    if not (np.array_equal(program.instructions, instructions)
            and np.array_equal(program.queue_len, queue_len)):
        raise ValueError(f"{path}: planning {meta['model']} batch {meta['batch']} now gives "
                         "another program than the one traced (the scheduler changed); "
                         "trace it again")
    return program, timing, meta


def _claims_of(program, instructions, queue_len):
    """The claim map (Program.as_executed's argument) of a claimed step kept as executed:
    the records past each SM's static queue, by uid."""
    import numpy as np

    from megakernel.scheduler import isa
    claimed = np.full((program.num_sms, program.claim_len), -1, np.int64)
    first = int(program.queue_len.sum())      # claim k has uid first + k
    for s, (n0, n) in enumerate(zip(program.queue_len, queue_len)):
        uids = instructions[s, n0:n, isa.HEADER.index("uid")]
        claimed[s, :len(uids)] = uids - first
    return claimed


class Traced:
    """The GPU side: one set of weights and inputs; traces any program of this shape."""

    def __init__(self, args, device):
        import torch

        from megakernel import ModelConfig, Weights
        from megakernel.bench import harness
        self.args, self.device, self.harness = args, device, harness
        self.cfg = ModelConfig.preset(args.model)
        self.w = Weights.random(self.cfg, seed=0, dtype=torch.bfloat16, device=device)
        self.inputs = harness.seeded_inputs(self.cfg, args.batch, args.pos, device)
        self.flush = harness.L2Flush(device)
        self.name = torch.cuda.get_device_name(device)
        self.num_sms = torch.cuda.get_device_properties(device).multi_processor_count
        self.pages = self.phases = None   # ring-page and phase stamps of the last traced replay
        self.executed = None              # a program with claims: its last traced replay's queues
        if args.phases and PHASE_FLAG not in args.build_flag:
            args.build_flag.append(PHASE_FLAG)

    def plan(self, gpu=None):
        from megakernel.profiling import nvtx_range
        from megakernel.scheduler import plan
        from megakernel.scheduler.plan import parse_options
        a = self.args
        with nvtx_range("megakernel.plan"):
            return plan(self.cfg, batch=a.batch, num_sms=self.num_sms, policy=a.policy,
                        granularity=a.granularity, gpu=gpu, kv_position=a.pos,
                        **parse_options(a.set))

    def run(self, program, timing: bool):
        """-> (median graph-replay ms, timing array of the last replay or None)."""
        import statistics

        import torch

        from megakernel.profiling import nvtx_range
        with nvtx_range(f"trace.run timing={timing}"):
            ms, stamps = self._replays(program, timing)
        torch.cuda.empty_cache()          # the decoder and its graph are gone
        return statistics.median(ms), stamps

    def _replays(self, program, timing: bool):
        from megakernel.bench.baselines import megakernel
        a = self.args
        dec, step, before = megakernel(self.cfg, self.w, a.batch, a.pos, *self.inputs,
                                       program=program, timing=timing,
                                       build_flags=tuple(a.build_flag), ablate=tuple(a.ablate))
        ms = self.harness.time_steps(step, a.iters, a.warmup,
                                     before=lambda: (self.flush(), before()))
        dec.runtime.check()
        if not timing:
            return ms, None
        stamps = dec.runtime.timing.cpu().numpy()
        self.pages = dec.runtime.page_timing.cpu().numpy()
        self.phases = dec.runtime.phase_timing.cpu().numpy()
        if program.claim_len:   # the queues the SMs ran in the last replay (Program.as_executed)
            self.executed = program.as_executed(dec.runtime.claim_map())
            stamps = stamps[:, :self.executed.max_len]
            self.phases = self.phases[:, :self.executed.max_len]
        return ms, stamps

    def trace_planned(self, gpu=None):
        """Plan, time timing off and on, keep <out>/trace.npz -> (program, timing, meta)."""
        from megakernel.bench.trace import save_npz
        from megakernel.scheduler.plan import parse_options
        program = self.plan(gpu)
        off, _ = self.run(program, timing=False)
        on, stamps = self.run(program, timing=True)
        program = self.executed or program
        a = self.args
        meta = dict(model=a.model, batch=a.batch, pos=a.pos, policy=a.policy,
                    granularity=a.granularity, num_sms=self.num_sms,
                    build_flags=list(a.build_flag), ablate=list(a.ablate),
                    options=parse_options(a.set), gpu_spec=program.gpu.to_dict(),
                    device=self.name, ms_timing_off=off,
                    ms_timing_on=on, commit=self.harness.git_commit(),
                    date=time.strftime("%Y-%m-%d %H:%M:%S %Z"))
        if gpu is None:
            a.out.mkdir(parents=True, exist_ok=True)
            kept = save_npz(a.out / 'trace.npz', stamps, program, meta, self.pages, self.phases)
            print(f"kept {kept}")
        return program, stamps, meta


def report(program, timing, meta, args, gpu, pages=None, phases=None) -> None:
    from megakernel.bench import trace
    from megakernel.scheduler import calibration, simulate
    m = calibration.measure(program, timing)
    title = (f"{meta['model']} batch {meta['batch']} pos {meta['pos']} on {meta['device']} "
             f"({meta['policy']}/{meta['granularity']}, {meta['num_sms']} SMs"
             + "".join(f", {k}={v}" for k, v in meta.get("options", {}).items()) + ")")
    print(f"trace: {trace.write_chrome_trace(args.out / 'trace.json', m, title)}")
    try:
        print(f"gantt: {trace.gantt(args.out / 'gantt.png', m, title)}")
    except RuntimeError as e:
        print(f"gantt: {e}")
    off, on = meta["ms_timing_off"], meta["ms_timing_on"]
    if off is not None:
        print(f"timing overhead (graph replay, same program): off {off:.4f} ms, on {on:.4f} ms"
              f" per step: {1e3 * (on - off):+.1f} us ({(on - off) / off:+.1%})")
    specs = {program.gpu.name: program.gpu}
    if args.calibrate:
        cal = calibration.fit(program, timing, name=calibration.slug(meta["device"]))
        path = calibration.save(cal, meta["device"], args.calibration_dir, source=title,
                                commit=meta["commit"], date=meta["date"])
        f = cal.fit
        print(f"calibration -> {path}: instr_latency {f['instr_latency_us']:.2f} us, "
              f"{f['sm_GBps']:.1f} GB/s per SM ({f['sm_GBps'] * program.num_sms / 1e3:.2f} "
              f"TB/s over {program.num_sms} SMs), counter latency "
              f"{f['counter_latency_us']:.2f} us (median of {f['waited']} waits); "
              f"R^2 {f['r2']:.3f} over {f['instructions']} instructions")
        specs["calibrated"] = cal.spec
    print(f"\nper opcode (predicted = cost model, mean us per instruction):\n"
          f"{trace.opcode_table(program, m, specs)}\n")
    print(f"stragglers (wait end past the stage's median, by the previous end):\n"
          f"{trace.straggler_table(m)}\n")
    release = trace.release_line(program, timing)
    if release:
        print(release)
    if pages is not None:
        print(f"ring pages (timing build):\n{trace.page_table(program, timing, pages)}\n")
        print(f"ring pages issued over a layer:\n"
              f"{trace.issue_timeline(program, timing, pages)}\n")
        loader = trace.loader_table(program, timing, pages)
        if loader is not None:
            print(f"loader (timing build):\n{loader}\n")
        got = trace.ring_constants(program, timing, pages, program.gpu)
        spread = trace.stage_spread(program, timing)
        if spread is not None:
            got["ring_spread_us"] = spread
        print("ring model constants from this trace (trace.ring_constants, stage_spread; us, "
              "the spec's in brackets): " + ", ".join(f"{k} {v:.2f} ({getattr(program.gpu, k):.2f})"
                                        for k, v in got.items() if k != "instructions")
              + f"; {got['instructions']} instructions\n")
    if phases is not None:
        print(f"phases inside instructions ({PHASE_FLAG} build):\n"
              f"{trace.phase_table(program, timing, phases)}\n")
    replay = f" (graph replay, timing off: {1e3 * off:.1f} us with launch)" if off else ""
    print(f"step: measured {m.span_us:.1f} us from the first instruction to the last{replay}")
    for label, spec in specs.items():
        pred = simulate(program, spec).total_us
        print(f"  predicted ({label}): {pred:.1f} us, {pred / m.span_us - 1:+.1%} vs measured"
              f" -> {'within' if abs(pred / m.span_us - 1) <= 0.25 else 'NOT within'} 25%")
    from megakernel.scheduler.ring_model import RingModel, simulate_ring
    ring = RingModel.for_build(program.batch, meta.get("build_flags", ()), meta.get("ablate", ()))
    if ring is not None and program.tp == 1:
        pred = simulate_ring(program, ring).total_us
        print(f"  predicted (ring model, {program.gpu.name}): {pred:.1f} us, "
              f"{pred / m.span_us - 1:+.1%} vs measured")
    if args.calibrate and gpu is not None:
        program2, timing2, meta2 = gpu.trace_planned(specs["calibrated"])
        span2 = calibration.measure(program2, timing2).span_us
        pred2 = program2.predicted_us
        print(f"re-planned with the calibrated constants: predicted {pred2:.1f} us, measured "
              f"{span2:.1f} us ({pred2 / span2 - 1:+.1%}); graph replay "
              f"{meta2['ms_timing_off']:.4f} ms/step vs {off:.4f} with the uncalibrated plan")
