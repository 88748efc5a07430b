"""Tensor parallelism on the GPU: one megakernel per rank, one Python process driving all.

Design (issue 7): a single process owns every rank's GPU. It enables peer access between
the GPUs (cudaDeviceEnablePeerAccess; NVLink multicast is never used), so with unified
addressing a kernel on GPU r can store into GPU s's buffers and bump its counters directly.
Each rank gets its own Runtime (its shard's packed weights, Buffers, Program) and its own
stream; a step enqueues every rank's launch back to back, all grids are resident at once
and synchronise only through counters (system-scope release/acquire, csrc/interpreter.cuh).
Ranks may share a GPU (each then plans for its share of the SMs): that runs the same code
path on one GPU, which is how the single-H100 tests exercise it.

comm="nccl" is the ablation: the same Programs cut into 2L + 2 phases
(scheduler/phases.py), one launch per phase with all-rank stores and signals kept on the
rank, and NCCL collectives (torch.cuda.nccl, single-process multi-GPU) in between.

Streams: `launch_step` forks from the caller's current stream on rank 0's device into the
rank streams and joins back, so the caller (and a timer's events) see one ordered step.
"""
from __future__ import annotations

import os

import torch

from .runtime import Runtime
from .scheduler import phases as phases_mod

COMMS = ("peer", "nccl")
_FAILED_GRAPHS: list = []


def keep_failed_graphs(graphs) -> None:
    """Keep CUDAGraph objects whose capture failed alive for the life of the process: torch
    2.11 aborts the process in ~CUDAGraph of such a graph ("The graph should be registered
    to the state", seen on 2 H200s)."""
    _FAILED_GRAPHS.extend(graphs)


class TpRuntime:
    def __init__(self, packed: list, program, max_seq: int, comm: str = "peer",
                 **runtime_options):
        if comm not in COMMS:
            raise ValueError(f"comm must be one of {COMMS}, got {comm!r}")
        tp = int(program.tp)
        if tp < 2 or len(packed) != tp:
            raise ValueError(f"TpRuntime needs a TpProgram with tp >= 2 and one packed shard "
                             f"per rank; got tp={tp} and {len(packed)} shards")
        self.program, self.tp, self.comm = program, tp, comm
        self.ranks = [Runtime(packed[r], program.ranks[r], max_seq, **runtime_options)
                      for r in range(tp)]
        self.devices = [rt.device for rt in self.ranks]
        if comm == "nccl" and len(set(self.devices)) != tp:
            raise ValueError("comm='nccl' needs one GPU per rank (NCCL refuses two ranks on "
                             f"one device); devices: {[str(d) for d in self.devices]}")
        ext = self.ranks[0].ext
        for a in self.devices:
            for b in self.devices:
                ext.enable_peer_access(a.index, b.index)
        peers = [rt.peer_tensors() for rt in self.ranks]
        split = phases_mod.split_phases(program) if comm == "nccl" else [None] * tp
        for rt, ph in zip(self.ranks, split):
            rt.connect(peers, ph)
        self.num_phases = self.ranks[0].num_launches
        self.streams = [torch.cuda.Stream(d) for d in self.devices]
        if comm == "nccl":
            os.environ.setdefault("NCCL_NVLS_ENABLE", "0")   # no NVLink multicast

    @property
    def buffers(self):
        return self.ranks[0].buffers

    # -- one step -------------------------------------------------------------------------
    def launch_step(self, tokens: torch.Tensor | None = None) -> None:
        """Enqueue one step on every rank: tokens (None: each rank's last greedy tokens) ->
        token buffers, the kernel(s), position += 1. Forks from and joins into the current
        stream of rank 0's device."""
        self._forked(lambda: self._enqueue(tokens))

    def _forked(self, work) -> None:
        """Run `work` (which enqueues on the rank streams) after everything already on the
        caller's stream of rank 0's device, and make that stream wait for it."""
        caller = torch.cuda.current_stream(self.devices[0])
        for s in self.streams:
            s.wait_stream(caller)
        work()
        for s in self.streams:
            caller.wait_stream(s)

    def _enqueue(self, tokens) -> None:
        """The step's work on the rank streams, no fork or join (what TpGraph captures)."""
        for rt, s in zip(self.ranks, self.streams):
            with torch.cuda.device(rt.device), torch.cuda.stream(s):
                buf = rt.buffers
                buf.tokens.copy_(buf.out_tokens if tokens is None else tokens, non_blocking=True)
                if self.comm == "nccl":
                    for t in (buf.logits, buf.amax_val, buf.amax_idx):
                        t.zero_()                       # summed over ranks after LMHEAD
        for p in range(self.num_phases):
            for rt, s in zip(self.ranks, self.streams):
                with torch.cuda.device(rt.device), torch.cuda.stream(s):
                    rt.launch(p)
            if self.comm == "nccl":
                self._collective(p)
        for rt, s in zip(self.ranks, self.streams):
            with torch.cuda.device(rt.device), torch.cuda.stream(s):
                rt.buffers.pos.add_(1)

    def fill_position(self, pos: int) -> None:
        """Every rank's position buffer <- pos, on the rank streams (ordered with steps)."""
        def fill():
            for rt, s in zip(self.ranks, self.streams):
                with torch.cuda.device(rt.device), torch.cuda.stream(s):
                    rt.buffers.pos.fill_(pos)
        self._forked(fill)

    def _collective(self, p: int) -> None:
        step = phases_mod.collective_after(p, self.program.config.L)
        if step is None:
            return
        import torch.cuda.nccl as nccl
        bufs = [rt.buffers for rt in self.ranks]
        kind, level = step
        if kind == "gather_part":
            nccl.all_gather([b.part[level, r] for r, b in enumerate(bufs)],
                            [b.part[level] for b in bufs], streams=self.streams)
        else:
            for name in ("logits", "amax_val", "amax_idx"):
                nccl.all_reduce([getattr(b, name) for b in bufs], streams=self.streams)

    def capture(self, tokens: torch.Tensor | None = None,
                error_mode: str = "relaxed") -> "TpGraph":
        """CUDA graphs of one step (greedy feedback by default), one per rank device, captured
        together; replay() forks and joins like launch_step. error_mode: torch's
        capture_error_mode: the second device's capture_begin is an unsafe call while the
        first device captures, so only "relaxed" works with several GPUs (measured on two
        H200s, torch 2.11)."""
        return TpGraph(self, tokens, error_mode)

    # -- state ----------------------------------------------------------------------------
    def error(self) -> str | None:
        """Synchronise every rank; every rank's error report (failing ranks first), or None."""
        msgs = [m for m in (rt.error() for rt in self.ranks) if m is not None]
        msgs.sort(key=lambda m: "aborted because" in m)
        return "\n".join(msgs) if msgs else None

    def check(self) -> None:
        msg = self.error()
        if msg is not None:
            for rt in self.ranks:
                rt.reset_sync()
            raise RuntimeError(msg)

    def reset(self) -> None:
        for rt in self.ranks:
            rt.reset()


class TpGraph:
    """One CUDA graph per device of a TpRuntime step, captured on the stream of the device's
    first rank (ranks sharing the device fork from it inside the capture). No event crosses
    devices inside a capture; the captures of all devices are open at once so the NCCL
    calls of the ablation, which span the devices, are captured too."""

    def __init__(self, rt: TpRuntime, tokens, error_mode: str = "relaxed"):
        self.rt = rt
        devices = list(dict.fromkeys(rt.devices))
        for d in devices:
            torch.cuda.synchronize(d)
        self.graphs = {d: torch.cuda.CUDAGraph() for d in devices}
        self.lead = {d: rt.streams[rt.devices.index(d)] for d in devices}
        followers = [(s, self.lead[d]) for s, d in zip(rt.streams, rt.devices)
                     if s is not self.lead[d]]
        saved = {d: torch.cuda.current_stream(d) for d in devices}
        device = torch.cuda.current_device()
        begun, ok = [], False
        try:
            # torch.cuda.graph() synchronises on entry, which would break the first capture
            # while opening the second: begin the captures by hand.
            for d in devices:
                with torch.cuda.device(d):
                    torch.cuda.set_stream(self.lead[d])
                    self.graphs[d].capture_begin(capture_error_mode=error_mode)
                begun.append(d)
            for s, lead in followers:
                s.wait_stream(lead)
            rt._enqueue(tokens)
            for s, lead in followers:
                lead.wait_stream(s)
            ok = True
        finally:
            try:
                for d in reversed(begun):
                    with torch.cuda.device(d):
                        self.graphs[d].capture_end()
            finally:
                for d in devices:
                    with torch.cuda.device(d):
                        torch.cuda.set_stream(saved[d])
                torch.cuda.set_device(device)
                if not ok:
                    keep_failed_graphs(self.graphs.values())

    def replay(self) -> None:
        caller = torch.cuda.current_stream(self.rt.devices[0])
        for d, g in self.graphs.items():
            self.lead[d].wait_stream(caller)
            with torch.cuda.device(d), torch.cuda.stream(self.lead[d]):
                g.replay()
        for d in self.graphs:
            caller.wait_stream(self.lead[d])
