"""Cost model: predicted time of every instruction on a GPU described by a GpuSpec.

    time_us = instr_latency_us + max(bytes / sm_bandwidth, flops / sm_flop_rate)
    sm_bandwidth = min(hbm_bytes_per_s / active_sms, sm_max_bytes_per_s)

`active_sms` is the program's num_sms: every SM is assumed to stream at once (a decode
step is one long stream of HBM reads), each with an equal share of the bandwidth, capped
by what one SM can pull alone. bytes = weights + activations read and written + the KV
cache an ATTN split reads at an assumed position (plan option kv_position). Counter
latency (signal -> consumer sees it) is charged by the simulator on every dependency edge.
All constants come from a plain dict (JSON-loadable) so a GPU trace can recalibrate them.
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np

from megakernel.config import ModelConfig

from . import isa
from .isa import Op
from .table import Instrs

# The ring model's (ring_model.py) constants. Measured on committed H100 traces of 1B
# (bench/NOTES.md, session 38; bench/trace.py ring_constants reads them off any trace with
# page stamps): a matvec's time outside its pages (setup, staging, epilogue, release), ATTN's
# whole time and the partials' merge (ATTN_REDUCE; ATTN_OPROJ on top of the matvec's), each
# net of its non-weight bytes at the SM's share; the consumers' time on a ring page on CUDA
# cores and on tensor cores (batch >= 3); the wait a dependent load adds per copy of its SM
# in flight (0.25-0.5 us a page in the heads' stamps); a page's copy from issue to landed
# with one page in flight per SM (the s10 probe: one keeps ~99% of the stream); and the
# standard deviation of a stage's end times across SMs, which a wait on the whole stage
# pays as its last signaller's lag (bench/trace.py stage_spread: 0.36-0.43 us).
RING_DEFAULTS = dict(ring_head_us=1.9, ring_attn_us=4.5, ring_merge_us=2.4, ring_page_us=0.5,
                     ring_page_us_tc=0.75, ring_queue_us=0.4, ring_mem_latency_us=1.4,
                     ring_spread_us=0.37)

PRESETS: dict[str, dict] = {
    # H100 SXM 80GB. hbm_bytes_per_s: read bandwidth measured on the project's H100 (BRIEF.md).
    # The rest are first guesses, to be calibrated against kernel traces.
    "h100": dict(name="h100", num_sms=132, hbm_bytes_per_s=2.95e12, sm_max_bytes_per_s=1.0e11,
                 clock_hz=1.755e9, fp32_flops_per_sm_cycle=256.0, instr_latency_us=0.6,
                 counter_latency_us=0.8, weight_bytes=2, kv_bytes=2, act_bytes=4,
                 **RING_DEFAULTS),
}


@dataclasses.dataclass(frozen=True)
class GpuSpec:
    name: str
    num_sms: int
    hbm_bytes_per_s: float          # achievable read bandwidth of the whole GPU
    sm_max_bytes_per_s: float       # the most one SM can stream when it has HBM to itself
    clock_hz: float
    fp32_flops_per_sm_cycle: float  # 256 on Hopper: 128 FP32 lanes x FMA
    instr_latency_us: float         # fixed cost of every instruction (fetch, setup, norm, store)
    counter_latency_us: float       # producer's signal -> a waiting consumer proceeds
    weight_bytes: int = 2           # bf16 weights
    kv_bytes: int = 2               # bf16 KV cache
    act_bytes: int = 4              # fp32 activations
    # the ring model's (RING_DEFAULTS; calibration files older than it lack them)
    ring_head_us: float = RING_DEFAULTS["ring_head_us"]
    ring_page_us: float = RING_DEFAULTS["ring_page_us"]
    ring_page_us_tc: float = RING_DEFAULTS["ring_page_us_tc"]
    ring_attn_us: float = RING_DEFAULTS["ring_attn_us"]
    ring_merge_us: float = RING_DEFAULTS["ring_merge_us"]
    ring_queue_us: float = RING_DEFAULTS["ring_queue_us"]
    ring_mem_latency_us: float = RING_DEFAULTS["ring_mem_latency_us"]
    ring_spread_us: float = RING_DEFAULTS["ring_spread_us"]

    def __post_init__(self):
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if f.name != "name" and not v > 0:
                raise ValueError(f"GpuSpec {self.name!r}: {f.name} must be > 0, got {v!r}")

    @classmethod
    def from_dict(cls, d: dict) -> "GpuSpec":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise ValueError(f"GpuSpec: unknown keys {sorted(unknown)}; known: {sorted(names)}")
        return cls(**d)

    @classmethod
    def load(cls, gpu) -> "GpuSpec":
        """A GpuSpec from itself, None (h100), a preset name, a dict, or a JSON file path."""
        if isinstance(gpu, GpuSpec):
            return gpu
        if gpu is None:
            gpu = "h100"
        if isinstance(gpu, dict):
            return cls.from_dict(gpu)
        if gpu in PRESETS:
            return cls.from_dict(PRESETS[gpu])
        if Path(gpu).is_file():
            return cls.from_dict(json.loads(Path(gpu).read_text()))
        raise ValueError(f"gpu {gpu!r}: not a preset {sorted(PRESETS)} nor a JSON file")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def sm_bytes_per_s(self, active_sms: int) -> float:
        return min(self.hbm_bytes_per_s / min(active_sms, self.num_sms), self.sm_max_bytes_per_s)


def instruction_bytes_flops(ins: Instrs, cfg: ModelConfig, batch: int, attn_splits: int,
                            lm_slices: int, spec: GpuSpec, kv_position: int, tp: int = 1):
    """(bytes, flops) float64 [N] each instruction moves and computes (peer stores priced
    as local ones)."""
    B, d, I, H, G, D = batch, cfg.d, cfg.I, cfg.H, cfg.G, cfg.D
    wb, kb, ab = spec.weight_bytes, spec.kv_bytes, spec.act_bytes
    op, a = ins.op, ins.args.astype(np.float64)
    rows = a[:, 1]
    nbytes = np.zeros(len(op))
    flops = np.zeros(len(op))

    def put(which, b, f=0.0):
        m = op == which
        nbytes[m] = b[m] if np.ndim(b) else b
        flops[m] = f[m] if np.ndim(f) else f

    put(Op.EMBED, B * rows * (wb + ab))
    # matvec: weight rows + the input vector (normed ones also read the norm weight) + outputs
    put(Op.QKV, rows * d * wb + B * d * ab + d * wb + B * rows * ab, 2.0 * B * rows * d)
    put(Op.OPROJ, rows * H * D * wb + B * H * D * ab + (2 + a[:, 2]) * B * rows * ab,
        2.0 * B * rows * H * D)                                # + the copy's stores
    # + GATEUP's copies (isa.py copy: its column range of resid, read once, stored copy times)
    put(Op.GATEUP, rows * d * wb + B * d * ab + d * wb + B * rows / 2 * ab
        + np.where(a[:, 5] > 0, (1 + a[:, 5]) * B * a[:, 4] * ab, 0), 2.0 * B * rows * d)
    # DOWN's K slice (kn > 0; the whole of I at 0): its adds an L2 read-modify-write each,
    # into two levels with copy
    k = np.where(a[:, 4] > 0, a[:, 4], I)
    adds = np.where(a[:, 4] > 0, 1 + a[:, 2], 1)
    put(Op.DOWN, rows * k * wb + B * k * ab + 2 * adds * B * rows * ab, 2.0 * B * rows * k)
    put(Op.LMHEAD, rows * d * wb + B * d * ab + d * wb + B * rows * ab, 2.0 * B * rows * d)
    positions = -(-(kv_position + 1) // attn_splits)
    put(Op.ATTN, 2 * positions * D * kb + 2 * G * D * ab, 4.0 * G * D * positions)
    heads = a[:, 3]   # ATTN_REDUCE's nheads
    put(Op.ATTN_REDUCE, attn_splits * heads * (D + 1) * ab + heads * D * ab)
    merging = _merging(ins, attn_splits)   # + a whole group's reduce
    nbytes[merging] += attn_splits * G * (D + 1) * ab + G * D * ab
    # ATTN_OPROJ: the reduce of ndims dims of every b, a matvec of ndims wo_t rows of ncols
    # columns, and atomic adds of B * ncols floats (an L2 read-modify-write each)
    dims, ncols = a[:, 2], a[:, 4]
    put(Op.ATTN_OPROJ, B * attn_splits * (dims + 1) * ab + dims * ncols * wb + 2 * B * ncols * ab,
        2.0 * B * dims * ncols)
    put(Op.ARGMAX, 2 * B * lm_slices * ab + B * 8)
    put(Op.RESID_SUM, (tp + 2) * B * rows * ab, (tp + 1.0) * B * rows)
    for fold_op in isa.FOLD_OPS:   # + the tp partials staged, + the residual slice written
        k = isa.word_index(fold_op, "fold") - len(isa.HEADER)
        m = (op == fold_op) & (a[:, k] != 0)
        nbytes[m] += tp * B * d * ab + B * a[m, k + 2] * ab
        flops[m] += tp * B * d
    return nbytes, flops


def _merging(ins: Instrs, attn_splits: int) -> np.ndarray:
    """bool [N]: the ATTN splits priced with their group's merge (split NS-1 of a merging
    group; at run time the last to finish merges, isa.py)."""
    return (ins.op == Op.ATTN) & (ins.args[:, 3] != 0) & (ins.args[:, 2] == attn_splits - 1)


def instruction_us(ins: Instrs, cfg: ModelConfig, batch: int, attn_splits: int, lm_slices: int,
                   spec: GpuSpec, active_sms: int, kv_position: int, tp: int = 1) -> np.ndarray:
    """Predicted microseconds [N] of each instruction."""
    nbytes, flops = instruction_bytes_flops(ins, cfg, batch, attn_splits, lm_slices, spec,
                                            kv_position, tp)
    flop_rate = spec.fp32_flops_per_sm_cycle * spec.clock_hz
    busy = np.maximum(nbytes / spec.sm_bytes_per_s(active_sms), flops / flop_rate)
    # a merging split also waits for its ticket's atomic add, a counter round trip
    ticket = spec.counter_latency_us * _merging(ins, attn_splits)
    return spec.instr_latency_us + ticket + 1e6 * busy
