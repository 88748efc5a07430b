"""CpuInterpreter: runs a scheduler Program on the CPU, the oracle for the GPU kernel.

Same buffers and counters as the kernel (megakernel.buffers), each opcode executed by its
PyTorch reference (megakernel.ops_ref); a program with ATTN_OPROJ gets wo_t packed too
(packing.add_wo_t), which it reads as the kernel does. A step executes the per-SM queues in
one legal interleaving: at each point a seeded random.Random picks one SM whose next
instruction's waits hold under the monotonic rule of isa.py, counter[c] - target[c] *
(epoch + 1) >= 0 (int32 wrapping), runs it, then adds 1 to its signal counter. A program
with a claim list (Program.claim) is run as the kernel runs it: an SM that has finished
its static queue and holds no unfinished claimed record may take the next unclaimed one
(one shared index), and that claim is one of the steps the rng picks among, so different
interleavings hand out the claims differently; the SM then runs it once its waits hold.
`claimed` records who took what, as the kernel's timing build does. The rng advances
across steps, so successive steps run different interleavings.

Invariants checked every step: no SM is stuck before all queues finish (else RuntimeError
naming SM, queue index, uid, opcode, counter, value and needed value); after the step the
epoch advances by one and every counter equals target * epoch (monotonic counters).

Tensor parallelism (prog a TpProgram): N simulated GPUs, one Buffers and one weight shard
per rank; one seeded random legal interleaving of the SM queues of ALL ranks; a record with
all_ranks stores into every rank's Buffers and bumps its signal counter on every rank.
Claims need tp = 1.
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
        if tp > 1 and any(len(p.claim) for p in self.ranks):
            raise ValueError("CpuInterpreter: claimed records (Program.claim) need tp = 1")
        if comm not in ("peer", "nccl") or (comm == "nccl" and tp == 1):
            raise ValueError(f"comm must be 'peer', or 'nccl' under tp > 1; got {comm!r}")
        self.comm = comm
        # Per phase (one phase unless comm="nccl"): the flat list of every rank's SM queues,
        # rank-major: queue k is SM k % num_sms of rank k // num_sms; each a list of decoded
        # records; the decoded claim list (tp = 1); and [tp, num_counters] each rank's own
        # targets.
        per_rank = (phases_mod.split_phases(prog) if comm == "nccl"
                    else [[p] for p in self.ranks])
        self.phases = [([[decode(p.instructions[sm, i]) for i in range(int(p.queue_len[sm]))]
                         for p in progs for sm in range(int(p.num_sms))],
                        [decode(r) for p in progs for r in p.claim],
                        np.stack([np.asarray(p.counter_targets, np.int64) for p in progs]))
                       for progs in zip(*per_rank)]
        self.rank_weights = [pack_weights(weights, dtype=dtype, device="cpu", tp=tp, rank=r)
                             for r in range(tp)]
        if any(r["op"] == Op.ATTN_OPROJ for queues, claims, _ in self.phases
               for rec in (*queues, claims) for r in rec):
            self.rank_weights = [add_wo_t(w) for w in self.rank_weights]    # ATTN_OPROJ's
        self.weights = self.rank_weights[0]
        self.rank_buffers = [Buffers.allocate(cfg if tp == 1 else p.config, p, max_seq,
                                              device="cpu", kv_dtype=self.weights.dtype)
                             for p in self.ranks]
        self.buffers = self.rank_buffers[0]
        self.queues, self.claims, self.targets = self.phases[0]
        self._rng = random.Random(seed)
        self.trace: list[tuple] = []   # (sm, uid) ((rank, sm, uid) under tp) of the last step
        # int32 [num_sms, claim_len] of the last step: row s the claim indices SM s took, in
        # order, then -1 (Program.as_executed takes it)
        self.claimed = np.full((len(self.queues), len(self.claims)), -1, np.int32)
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
        for p, (self.queues, self.claims, self.targets) in enumerate(self.phases):
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
        taken: list[list[int]] = [[] for _ in self.queues]  # per SM: the claims it took
        held = [False] * len(self.queues)    # its last claim taken but not yet run
        next_claim = 0                       # the shared index: claims[:next_claim] are taken
        self.trace = []
        while True:
            live = [k for k, q in enumerate(self.queues) if head[k] < len(q) or held[k]]
            free = [] if next_claim == len(self.claims) else [
                k for k, q in enumerate(self.queues) if head[k] == len(q) and not held[k]]
            if not live and not free:
                break
            ready = [k for k in live if self._blocked_wait(
                self._current(k, head, taken)[0], *self._state(k, counters, needed)) is None]
            if not ready and not free:
                self._record_watchdog(live[0], head, taken, *self._state(live[0], counters,
                                                                         needed))
                raise RuntimeError(self._deadlock_report(live, head, taken, counters, needed,
                                                         epoch))
            k = self._rng.choice(ready + free)
            if not held[k] and head[k] == len(self.queues[k]):    # k claims the next record
                taken[k].append(next_claim)
                next_claim += 1
                held[k] = True
                continue
            rank, sm = self._where(k)
            rec = self._current(k, head, taken)[0]
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
            if held[k]:
                held[k] = False
            else:
                head[k] += 1
        self.claimed = np.full((len(self.queues), len(self.claims)), -1, np.int32)
        for k, mine in enumerate(taken):
            self.claimed[k, :len(mine)] = mine

    def _current(self, k: int, head, taken) -> tuple[dict, int, int | None]:
        """(record, index in the order SM k runs them, claim index or None) of the
        instruction flat queue k runs next: its queue's head, else its last claim."""
        q = self.queues[k]
        if head[k] < len(q):
            return q[head[k]], head[k], None
        return self.claims[taken[k][-1]], len(q) + len(taken[k]) - 1, taken[k][-1]

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

    def _record_watchdog(self, k, head, taken, counters, needed) -> None:
        """The kernel's error record (in the blocked rank's Buffers): code, SM, queue index
        (a claimed record's: its static queue's length + the claims it took before), uid,
        counter, value, needed, op."""
        rec, index, _ = self._current(k, head, taken)
        rank, sm = self._where(k)
        c = self._blocked_wait(rec, counters, needed)
        self.rank_buffers[rank].error.copy_(torch.tensor(
            [int(Err.WATCHDOG), sm, index, rec["uid"], c, int(counters[c]), int(needed[c]),
             int(rec["op"])], dtype=torch.int32))

    def _deadlock_report(self, live, head, taken, counters, needed, epoch) -> str:
        lines = [f"deadlock in epoch {epoch}: no SM can progress, {len(live)} queues unfinished"]
        for k in live:
            rec, index, claim = self._current(k, head, taken)
            rank, sm = self._where(k)
            gpu = f"rank {rank} " if len(self.ranks) > 1 else ""
            what = f" (claim index {claim})" if claim is not None else ""
            value, need = counters[rank], needed[rank]
            c = self._blocked_wait(rec, value, need)
            lines.append(f"  {gpu}SM {sm} queue index {index}{what} uid {rec['uid']} opcode "
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
