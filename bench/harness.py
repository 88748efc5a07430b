"""The bench's timing primitives and stamp, shared by every contender and the trace.

Timing: `time_steps` enqueues warm-up steps, then per step a CUDA event pair around the step
only, with `before()` (an L2 flush, a position reset) enqueued between pairs, untimed; one
synchronisation at the end; the median is reported. Nothing a step reads survives in L2 to
the next: the weights of the models benched (2.5 GB for Llama-3.2-1B) are ~50x the 50 MB L2
of an H100 anyway, and `L2Flush` writes twice the L2 between steps so small models (and the
KV cache, activations) are not re-read from L2 either.
"""
from __future__ import annotations

import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent


def require_gpu(command: str) -> torch.device:
    """The current CUDA device, or RuntimeError saying what to do instead."""
    if not torch.cuda.is_available():
        why = "a CPU-only build" if not torch.version.cuda else "no device visible"
        raise RuntimeError(
            f"{command} times decode steps on a CUDA GPU, and torch {torch.__version__} sees "
            f"none ({why}). Run it on an H100/H200 machine (bench/device_bench.sh does the "
            "whole bench + trace in one call); here, `python -m megakernel plan` prints the "
            "cost model's prediction")
    return torch.device("cuda", torch.cuda.current_device())


class Progress:
    """Progress lines on stderr: `[bench   12.3 s] message`."""

    def __init__(self, name: str):
        self.name, self.t0 = name, time.perf_counter()

    def elapsed(self) -> float:
        return time.perf_counter() - self.t0

    def __call__(self, message: str) -> None:
        print(f"[{self.name} {self.elapsed():7.1f} s] {message}", file=sys.stderr, flush=True)


class L2Flush:
    """Writes a buffer twice the device's L2: what a step left in L2 is evicted."""

    def __init__(self, device):
        l2 = torch.cuda.get_device_properties(device).L2_cache_size
        self.buf = torch.empty(max(2 * l2, 1 << 20) // 4, dtype=torch.int32, device=device)

    def __call__(self) -> None:
        self.buf.zero_()


def time_steps(step, iters: int, warmup: int, before=None) -> list[float]:
    """Milliseconds of each of `iters` calls of step() (CUDA events around the step only)."""
    for _ in range(warmup):
        if before:
            before()
        step()
    pairs = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
             for _ in range(iters)]
    torch.cuda.synchronize()
    for start, end in pairs:
        if before:
            before()
        start.record()
        step()
        end.record()
    torch.cuda.synchronize()
    return [start.elapsed_time(end) for start, end in pairs]


def summarize(ms: list[float]) -> dict:
    q = statistics.quantiles(ms, n=10) if len(ms) > 1 else [ms[0]] * 9
    return {"ms_per_step": statistics.median(ms), "ms_min": min(ms), "ms_p90": q[8]}


def bandwidth(device, nbytes: int = 2 << 30, iters: int = 20) -> tuple[float, float]:
    """(copy, read) bytes per second of a device-to-device copy (read + write counted) and
    of a sum over the buffer, medians of `iters`."""
    a = torch.empty(nbytes // 2, dtype=torch.bfloat16, device=device).normal_()
    b = torch.empty_like(a)
    copy = statistics.median(time_steps(lambda: b.copy_(a), iters, 3))
    read = statistics.median(time_steps(lambda: a.sum(dtype=torch.float32), iters, 3))
    return 2 * nbytes / (copy / 1e3), nbytes / (read / 1e3)


def git_commit() -> str:
    """MK_COMMIT if set (the device copy's .git can be stale: it reported a commit from
    before the tree that ran), else git's HEAD."""
    if os.environ.get("MK_COMMIT"):
        return os.environ["MK_COMMIT"]
    try:
        out = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short=12", "HEAD"],
                             capture_output=True, text=True, timeout=10)
        if out.returncode == 0 and out.stdout.strip():
            return out.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        pass
    return "unknown"


def stamp(device) -> dict:
    props = torch.cuda.get_device_properties(device)
    return {"gpu": props.name, "num_sms": props.multi_processor_count,
            "torch": torch.__version__, "cuda": torch.version.cuda, "commit": git_commit(),
            "date": time.strftime("%Y-%m-%d %H:%M:%S %Z")}


def bytes_read(cfg, batch: int, pos: int) -> tuple[int, int]:
    """(weight bytes, KV bytes) a bf16 decode step at position `pos` must read: every
    weight once plus the batch's embedding rows, and keys + values of positions 0..pos."""
    weights = cfg.weight_bytes(2) + batch * cfg.d * 2
    kv = 2 * cfg.L * batch * cfg.Hkv * (pos + 1) * cfg.D * 2
    return weights, kv


def seeded_inputs(cfg, batch: int, pos: int, device):
    """Identical step inputs for every contender (and the compile child): tokens int64 [B]
    and the cache contents of positions 0..pos-1, k, v bf16 [L, B, Hkv, pos, D]."""
    gen = torch.Generator(device=device).manual_seed(1)
    tokens = torch.randint(0, cfg.V, (batch,), generator=gen, device=device)
    shape = (cfg.L, batch, cfg.Hkv, pos, cfg.D)
    k = torch.randn(shape, generator=gen, device=device).to(torch.bfloat16)
    v = torch.randn(shape, generator=gen, device=device).to(torch.bfloat16)
    return tokens, k, v


def seed_cache(k_cache: torch.Tensor, v_cache: torch.Tensor, k, v) -> None:
    """Copy the seeded positions into a [L, B, Hkv, S, D] cache pair (any dtype)."""
    k_cache[:, :, :, :k.shape[3]].copy_(k)
    v_cache[:, :, :, :v.shape[3]].copy_(v)


def fingerprint(weights) -> float:
    """A checksum of a few weight tensors: equal in two processes iff the weights agree."""
    lw = weights.layers[-1]
    return float(sum(t[:64].double().sum().item() for t in (weights.embed, lw.wq, lw.w_down)))
