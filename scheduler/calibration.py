"""Calibration: fit the cost model's constants (cost.py GpuSpec) to a measured megakernel
trace, save them per GPU, and hand them to plan() (`resolve`, the hook).

A trace is the kernel's timing array int64 [num_sms, max_len, 4]: %globaltimer ns of every
queued instruction's (wait start, wait end = compute start, end, and outputs written, the
moment before its release add, which the fit does not use); entries past an SM's queue_len
are 0. A program with claims (Program.claim) is traced through program.as_executed(claimed),
the queues its SMs ran that step (the kernel's timing then has max_len + claim_len rows).
The simulator (simulate.py) models an instruction as: it starts when its SM is free and its
counters are complete + counter_latency_us, then holds the SM for
instruction_us = instr_latency_us + bytes / sm_bandwidth. The fit measures those quantities:
    occupancy_i = end_i - (wait end_i if it waited longer than wait_eps_us, else the end of
                  the previous instruction on its SM: fetch and a satisfied counter check
                  are its own time) ~ instr_latency_us + bytes_i / sm_bandwidth
                  (least squares over every instruction)
    latency_i   = wait end_i - last end among the instructions signalling what it waits on
                  (median over the instructions that waited)
One trace has every SM streaming at once, so only the per-SM share of bandwidth is seen:
the calibrated spec has hbm_bytes_per_s = sm_bandwidth * num_sms and sm_max_bytes_per_s
>= sm_bandwidth; flop rates and element sizes stay as in the base spec.

Files: <dir>/<slug of the device name>.json = {"spec": GpuSpec dict, "fit": statistics,
"device": name, ...}. `resolve(gpu)` is plan()'s hook (a device name finds its file);
`for_device(name)` is what a decoder on that device plans with. numpy only.
"""
from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

import numpy as np

from .cost import PRESETS, GpuSpec, instruction_bytes_flops
from .table import Placed

CALIBRATION_DIR = Path(__file__).resolve().parent.parent / "bench" / "results" / "calibration"
WAIT_EPS_US = 1.0   # a wait shorter than this counts as none (%globaltimer ticks ~1 us apart)


def slug(name: str) -> str:
    """'NVIDIA H100 80GB HBM3' -> 'nvidia-h100-80gb-hbm3' (calibration file stem)."""
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


@dataclasses.dataclass
class Measured:
    """One step's trace, one row per queued instruction in Program.table() order."""
    table: Placed
    t0: np.ndarray       # float64 [N] us since the step's first wait start: wait start
    t1: np.ndarray       # float64 [N] wait end = compute start
    t2: np.ndarray       # float64 [N] end (outputs visible, counter bumped)
    nbytes: np.ndarray   # float64 [N] bytes the cost model says each instruction moves
    flops: np.ndarray    # float64 [N]
    ready: np.ndarray    # float64 [N] last end of what it waits on (nan: waits on nothing)
    prev_end: np.ndarray  # float64 [N] end of the SM's previous instruction (own t0 if first)

    @property
    def span_us(self) -> float:
        return float(self.t2.max() - self.t0.min()) if len(self.t2) else 0.0

    @property
    def wait_us(self) -> np.ndarray:
        return self.t1 - self.t0

    @property
    def compute_us(self) -> np.ndarray:
        return self.t2 - self.t1

    def waited(self, wait_eps_us: float = WAIT_EPS_US) -> np.ndarray:
        """bool [N]: found a counter short and waited longer than wait_eps_us."""
        return self.wait_us > wait_eps_us

    def occupancy_us(self, wait_eps_us: float = WAIT_EPS_US) -> np.ndarray:
        """float64 [N]: how long each instruction held its SM, in the simulator's terms."""
        return self.t2 - np.where(self.waited(wait_eps_us), self.t1, self.prev_end)


def measure(program, timing) -> Measured:
    """timing: int64 [num_sms, >= max_len, 3 or 4] (numpy) of one step of `program`: wait
    start, wait end, end (and outputs written, unused here), by (SM, queue index). A program
    with claims is measured through program.as_executed(claimed), whose queues may be
    shorter than the kernel's timing rows (max_len + claim_len of the claimed program)."""
    program.require_static("calibration.measure")
    timing = np.asarray(timing)
    want = (program.num_sms, program.max_len)
    if timing.ndim != 3 or timing.shape[0] != want[0] or timing.shape[1] < want[1] \
            or timing.shape[2] not in (3, 4):
        raise ValueError(f"timing has shape {timing.shape}, the program needs [{want[0]}, "
                         f">= {want[1]}, 3 or 4]")
    t = program.table()
    stamps = timing[t.sm, t.index, :3].astype(np.int64)                 # [N, 3]
    bad = (stamps[:, 0] <= 0) | (np.diff(stamps, axis=1) < 0).any(axis=1)
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise ValueError(f"{int(bad.sum())} of {len(t)} instructions have no or unordered "
                         f"timestamps (first: {t.where(i)}: {stamps[i].tolist()}); did the "
                         "step finish, with timing on?")
    us = (stamps - stamps[:, 0].min()) / 1e3
    t0, t1, t2 = us[:, 0], us[:, 1], us[:, 2]
    nbytes, flops = instruction_bytes_flops(t, program.config, program.batch,
                                            program.attn_splits, program.lm_slices,
                                            program.gpu, program.options["kv_position"])
    first = t.index == 0
    prev_end = np.where(first, t0, np.roll(t2, 1))       # rows are (sm, index) ordered
    done = np.full(program.num_counters, -np.inf)
    sig = t.signal >= 0
    np.maximum.at(done, t.signal[sig], t2[sig])
    ready = np.full(len(t), np.nan)
    for i, w in enumerate(t.waits.tolist()):
        ends = [done[w[k]:w[k] + w[k + 1]].max() for k in range(0, len(w), 2) if w[k + 1]]
        if ends:
            ready[i] = max(ends)
    return Measured(t, t0, t1, t2, nbytes, flops, ready, prev_end)


@dataclasses.dataclass
class Calibration:
    spec: GpuSpec
    fit: dict            # instr_latency_us, sm_GBps, counter_latency_us, r2, counts


def fit(program, timing, base=None, name: str | None = None,
        wait_eps_us: float = WAIT_EPS_US) -> Calibration:
    """Fit instr_latency_us, the per-SM bandwidth and counter_latency_us to one traced step
    of `program` (timing as in `measure`). base: the spec the rest is kept from (the
    program's own by default); name: the calibrated spec's name (the base's by default)."""
    m = measure(program, timing)
    base = program.gpu if base is None else GpuSpec.load(base)
    x, y = m.nbytes, m.occupancy_us(wait_eps_us)
    (lat, slope), *_ = np.linalg.lstsq(np.stack([np.ones_like(x), x], 1), y, rcond=None)
    if lat < 1e-3:                        # GpuSpec needs > 0: pin it and refit the slope
        lat = 1e-3
        slope = float(x @ (y - lat) / (x @ x))
    if not slope > 0:
        raise ValueError("instruction time does not grow with the bytes moved: no bandwidth "
                         "can be fitted (is the trace from this program?)")
    resid = y - (lat + slope * x)
    r2 = 1.0 - float(resid @ resid) / max(float(((y - y.mean()) ** 2).sum()), 1e-30)
    waited = m.waited(wait_eps_us) & np.isfinite(m.ready)
    seen = m.t1[waited] - m.ready[waited]
    counter = float(np.median(seen)) if len(seen) else base.counter_latency_us
    lat, sm_bw = float(lat), 1e6 / float(slope)   # us; bytes per second per SM
    spec = dataclasses.replace(
        base, name=name or base.name, num_sms=program.num_sms,
        hbm_bytes_per_s=sm_bw * program.num_sms,
        sm_max_bytes_per_s=max(base.sm_max_bytes_per_s, sm_bw * (1 + 1e-9)),
        instr_latency_us=lat, counter_latency_us=max(counter, 1e-3))
    stats = dict(instr_latency_us=lat, sm_GBps=sm_bw / 1e9,
                 counter_latency_us=spec.counter_latency_us, r2=r2, instructions=len(x),
                 waited=int(waited.sum()), wait_eps_us=wait_eps_us,
                 measured_span_us=m.span_us)
    return Calibration(spec, stats)


def save(cal: Calibration, device: str, directory=CALIBRATION_DIR, **meta) -> Path:
    """Write <directory>/<slug(device)>.json; meta: anything else worth keeping (JSON)."""
    path = Path(directory) / f"{slug(device)}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"device": device, "spec": cal.spec.to_dict(), "fit": cal.fit,
                                **meta}, indent=1))
    return path


def load(path) -> GpuSpec:
    return GpuSpec.from_dict(json.loads(Path(path).read_text())["spec"])


def resolve(gpu=None, directory=CALIBRATION_DIR) -> GpuSpec:
    """plan()'s GpuSpec for `gpu`. A device name (torch.cuda.get_device_name()) gets its
    saved calibration when there is one, else the preset named inside it ('h100' in
    'NVIDIA H100 80GB HBM3'). None, preset names, dicts, JSON paths and GpuSpecs load as
    GpuSpec.load does, uncalibrated, so default plans stay reproducible."""
    if isinstance(gpu, str) and gpu not in PRESETS and not Path(gpu).is_file():
        path = Path(directory) / f"{slug(gpu)}.json"
        if path.is_file():
            return load(path)
        named = [p for p in PRESETS if p in slug(gpu).split("-")]
        if named:
            return GpuSpec.load(named[0])
        saved = sorted(p.stem for p in Path(directory).glob("*.json"))
        raise ValueError(f"gpu {gpu!r}: not a preset {sorted(PRESETS)}, a JSON file nor a "
                         f"calibrated device (saved in {directory}: {saved or 'none'}); "
                         "calibrate it with `python -m megakernel trace --calibrate`")
    return GpuSpec.load(gpu)


def for_device(name: str, directory=CALIBRATION_DIR) -> GpuSpec:
    """The spec a decoder on device `name` should plan with: its calibration if saved, else
    the preset named inside the name, else the default preset (h100); never raises."""
    try:
        return resolve(name, directory)
    except ValueError:
        return GpuSpec.load(None)
