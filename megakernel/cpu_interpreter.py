"""CpuInterpreter: runs a scheduler Program on the CPU, the oracle for the GPU kernel.

Same buffers and counters as the kernel (megakernel.buffers), each opcode executed by its
PyTorch reference (megakernel.ops_ref); a program with ATTN_OPROJ gets wo_t packed too
(packing.add_wo_t), which it reads as the kernel does. A step executes the per-SM queues in
one legal interleaving: at each point a seeded random.Random picks one SM whose next
instruction's waits hold under the monotonic rule of isa.py, counter[c] - target[c] *
(epoch + 1) >= 0 (int32 wrapping), runs it, then adds 1 to its signal counter. The rng
advances across steps, so successive steps run different interleavings.

Invariants checked every step: no SM is stuck before all queues finish (else RuntimeError
naming SM, queue index, uid, opcode, counter, value and needed value); after the step the
epoch advances by one and every counter equals target * epoch (monotonic counters).

Tensor parallelism (prog a TpProgram): N simulated GPUs, one Buffers and one weight shard
per rank; one seeded random legal interleaving of the SM queues of ALL ranks; a record with
all_ranks stores into every rank's Buffers and bumps its signal counter on every rank.
`buffers` is rank 0's; step() returns rank 0's logits after checking that every rank holds
the same logits and next tokens. The trace then holds (rank, sm, uid).
comm="nccl" runs the NCCL-between-launches ablation instead (scheduler/phases.py): each
phase's queues with all-rank stores and signals kept on the rank, then the phase's
collective (an all-gather of the partials, or the sum of the LM-head outputs) simulated.
"""
from __future__ import annotations

import random

import numpy as np
import torch

from . import ops_ref
from .buffers import Buffers
from .config import ModelConfig
from .decoding import StepDecoder
from .packing import add_wo_t, pack_weights
from .scheduler import phases as phases_mod
from .scheduler.isa import NUM_WAITS, Err, Op, decode


def wrap32(x: np.ndarray) -> np.ndarray:
    """Integers wrapped into int32 range (two's complement, as the GPU's int32 arithmetic),
    returned as int64 so later differences do not overflow."""
    return ((np.asarray(x, dtype=np.int64) + 2 ** 31) % 2 ** 32 - 2 ** 31).astype(np.int64)


class CpuInterpreter(StepDecoder):
    def __init__(self, cfg: ModelConfig, weights, prog, max_seq: int = 2048, dtype=None,
                 seed: int = 0, comm: str = "peer"):
        self._init_sizes(cfg, int(prog.batch), max_seq)
        if getattr(prog, "config", cfg) != cfg:
            raise ValueError(f"CpuInterpreter: the program was planned for config "
                             f"{prog.config.name!r}, not {cfg.name!r}; plan it for this config")
        weights.check(cfg)
        self.program, self.device = prog, torch.device("cpu")
        self.ranks = getattr(prog, "ranks", None) or [prog]     # per-rank Programs
        tp = len(self.ranks)
        self.rank_weights = [pack_weights(weights, dtype=dtype, device="cpu", tp=tp, rank=r)
                             for r in range(tp)]
        if any((p.instructions[..., 0] == Op.ATTN_OPROJ).any() for p in self.ranks):
            self.rank_weights = [add_wo_t(w) for w in self.rank_weights]    # ATTN_OPROJ's
        self.weights = self.rank_weights[0]
        self.rank_buffers = [Buffers.allocate(cfg if tp == 1 else p.config, p, max_seq,
                                              device="cpu", kv_dtype=self.weights.dtype)
                             for p in self.ranks]
        self.buffers = self.rank_buffers[0]
        if comm not in ("peer", "nccl") or (comm == "nccl" and tp == 1):
            raise ValueError(f"comm must be 'peer', or 'nccl' under tp > 1; got {comm!r}")
        self.comm = comm
        # Per phase (one phase unless comm="nccl"): the flat list of every rank's SM queues,
        # rank-major: queue k is SM k % num_sms of rank k // num_sms; each a list of decoded
        # records; and [tp, num_counters] each rank's own targets.
        per_rank = (phases_mod.split_phases(prog) if comm == "nccl"
                    else [[p] for p in self.ranks])
        self.phases = [([[decode(p.instructions[sm, i]) for i in range(int(p.queue_len[sm]))]
                         for p in progs for sm in range(int(p.num_sms))],
                        np.stack([np.asarray(p.counter_targets, np.int64) for p in progs]))
                       for progs in zip(*per_rank)]
        self.queues, self.targets = self.phases[0]
        self._rng = random.Random(seed)
        self.trace: list[tuple] = []   # (sm, uid) ((rank, sm, uid) under tp) of the last step
        self.reset()

    def _reset(self) -> None:
        """Empty every sequence: zero counters and KV caches, poison the activations."""
        for buf in self.rank_buffers:
            buf.reset().poison()

    @property
    def position(self) -> int:
        return self.pos

    @property
    def out_tokens(self) -> torch.Tensor:
        """[B] int64 greedy next tokens of the last step, as the ARGMAX instruction wrote them."""
        return self.buffers.out_tokens.clone()

    def _step(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens: int64 [B] -> fp32 logits [B, V]; appends one position to every sequence."""
        for buf in self.rank_buffers:
            buf.tokens.copy_(tokens)
            buf.pos.fill_(self.pos)
        if self.comm == "nccl":
            for buf in self.rank_buffers:       # summed over ranks after the LM head
                for t in (buf.logits, buf.amax_val, buf.amax_idx):
                    t.zero_()
        trace = []
        for p, (self.queues, self.targets) in enumerate(self.phases):
            self._run_queues()
            trace += self.trace
            if self.comm == "nccl":
                self._collective(p)
        self.trace = trace
        # As the kernel: each block adds 1 to `done` when its queue ends; the last one
        # (done reaching num_sms * (epoch + 1)) advances the epoch.
        for buf in self.rank_buffers:
            buf.done += len(self.queues) // len(self.ranks)
            buf.epoch += 1
        self._check_counters()
        for r, buf in enumerate(self.rank_buffers[1:], start=1):
            if not (torch.equal(buf.logits, self.buffers.logits)
                    and torch.equal(buf.out_tokens, self.buffers.out_tokens)):
                raise RuntimeError(f"rank {r} ends the step with other logits or tokens than "
                                   "rank 0")
        return self.buffers.logits.clone()

    def _collective(self, p: int) -> None:
        """What NCCL does between phase p and p + 1 (scheduler.phases.collective_after)."""
        step = phases_mod.collective_after(p, self.config.L)
        if step is None:
            return
        bufs = self.rank_buffers
        kind, level = step
        if kind == "gather_part":
            for dst in bufs:
                for src, b in enumerate(bufs):
                    dst.part[level, src] = b.part[level, src]
            return
        for name in ("logits", "amax_val", "amax_idx"):
            total = sum(getattr(b, name) for b in bufs)
            for b in bufs:
                getattr(b, name).copy_(total)

    def _greedy(self, logits: torch.Tensor) -> torch.Tensor:
        return self.out_tokens

    def _where(self, k: int) -> tuple[int, int]:
        """(rank, sm) of flat queue k."""
        return divmod(k, len(self.queues) // len(self.ranks))

    def _state(self, k: int, counters, needed):
        """(counters, needed) of flat queue k's rank."""
        rank = self._where(k)[0]
        return counters[rank], needed[rank]

    def _run_queues(self) -> None:
        epoch = int(self.buffers.epoch[0])
        # numpy views sharing memory with each rank's counters
        counters = [buf.counters.numpy() for buf in self.rank_buffers]
        needed = wrap32(self.targets * (epoch + 1))          # [tp, num_counters]
        head = [0] * len(self.queues)
        self.trace = []
        while True:
            live = [k for k, q in enumerate(self.queues) if head[k] < len(q)]
            if not live:
                return
            ready = [k for k in live if self._blocked_wait(
                self.queues[k][head[k]], *self._state(k, counters, needed)) is None]
            if not ready:
                self._record_watchdog(live[0], head[live[0]], *self._state(live[0], counters,
                                                                           needed))
                raise RuntimeError(self._deadlock_report(live, head, counters, needed, epoch))
            k = self._rng.choice(ready)
            rank, sm = self._where(k)
            rec = self.queues[k][head[k]]
            local = self.comm == "nccl"
            ops_ref.run(rec, self.rank_weights[rank], self.rank_buffers[rank],
                        self.ranks[rank],
                        [self.rank_buffers[rank]] if local else self.rank_buffers)
            if rec["signal"] >= 0:
                everywhere = rec["all_ranks"] and not local
                for r in (range(len(self.ranks)) if everywhere else [rank]):
                    self.rank_buffers[r].counters[rec["signal"]] += 1
            self.trace.append((sm, rec["uid"]) if len(self.ranks) == 1 else
                              (rank, sm, rec["uid"]))
            head[k] += 1

    @staticmethod
    def _blocked_wait(rec: dict, counters: np.ndarray, needed: np.ndarray):
        """First counter c in rec's waits with counter[c] - needed[c] < 0, or None."""
        for i in range(NUM_WAITS):
            first, count = rec[f"wait{i}_first"], rec[f"wait{i}_count"]
            if count <= 0:
                continue
            short = wrap32(counters[first:first + count] - needed[first:first + count]) < 0
            if short.any():
                return first + int(np.argmax(short))
        return None

    def _record_watchdog(self, k, index, counters, needed) -> None:
        """The kernel's error record (in the blocked rank's Buffers): code, SM, queue index,
        uid, counter, value, needed, op."""
        rec = self.queues[k][index]
        rank, sm = self._where(k)
        c = self._blocked_wait(rec, counters, needed)
        self.rank_buffers[rank].error.copy_(torch.tensor(
            [int(Err.WATCHDOG), sm, index, rec["uid"], c, int(counters[c]), int(needed[c]),
             int(rec["op"])], dtype=torch.int32))

    def _deadlock_report(self, live, head, counters, needed, epoch) -> str:
        lines = [f"deadlock in epoch {epoch}: no SM can progress, {len(live)} queues unfinished"]
        for k in live:
            rec = self.queues[k][head[k]]
            rank, sm = self._where(k)
            gpu = f"rank {rank} " if len(self.ranks) > 1 else ""
            value, need = counters[rank], needed[rank]
            c = self._blocked_wait(rec, value, need)
            lines.append(f"  {gpu}SM {sm} queue index {head[k]} uid {rec['uid']} opcode "
                         f"{Op(rec['op']).name} waits on counter {c}: value {int(value[c])}, "
                         f"needs {int(need[c])}")
        return "\n".join(lines)

    def _check_counters(self) -> None:
        num_sms = len(self.queues) // len(self.ranks)
        for rank, buf in enumerate(self.rank_buffers):
            gpu = f" on rank {rank}" if len(self.ranks) > 1 else ""
            epoch, done = int(buf.epoch[0]), int(buf.done[0])
            if done != wrap32(num_sms * epoch):
                raise RuntimeError(f"after epoch {epoch}{gpu}: done = {done}, expected "
                                   f"{num_sms} SMs x epoch {epoch}")
            counters = buf.counters.numpy().astype(np.int64)
            targets = self.targets[rank]
            expected = wrap32(targets * epoch)
            bad = np.nonzero(counters != expected)[0]
            if len(bad):
                c = int(bad[0])
                raise RuntimeError(f"after epoch {epoch}{gpu}: {len(bad)} counters off target, "
                                   f"first counter {c} = {counters[c]}, expected {expected[c]} "
                                   f"(target {targets[c]} x epoch {epoch})")
