"""CpuInterpreter: runs a scheduler Program on the CPU, the oracle for the GPU kernel.

Same buffers and counters as the kernel (megakernel.buffers), each opcode executed by its
PyTorch reference (megakernel.ops_ref). A step executes the per-SM queues in one legal
interleaving: at each point a seeded random.Random picks one SM whose next instruction's
waits hold under the monotonic rule of isa.py, counter[c] - target[c] * (epoch + 1) >= 0
(int32 wrapping), runs it, then adds 1 to its signal counter. The rng advances across steps,
so successive steps run different interleavings.

Invariants checked every step: no SM is stuck before all queues finish (else RuntimeError
naming SM, queue index, uid, opcode, counter, value and needed value); after the step the
epoch advances by one and every counter equals target * epoch (monotonic counters).
"""
from __future__ import annotations

import random

import numpy as np
import torch

from . import ops_ref
from .buffers import Buffers
from .config import ModelConfig
from .decoding import StepDecoder
from .packing import pack_weights
from .scheduler.isa import NUM_WAITS, Err, Op, decode


def wrap32(x: np.ndarray) -> np.ndarray:
    """Integers wrapped into int32 range (two's complement, as the GPU's int32 arithmetic),
    returned as int64 so later differences do not overflow."""
    return ((np.asarray(x, dtype=np.int64) + 2 ** 31) % 2 ** 32 - 2 ** 31).astype(np.int64)


class CpuInterpreter(StepDecoder):
    def __init__(self, cfg: ModelConfig, weights, prog, max_seq: int = 2048, dtype=None,
                 seed: int = 0):
        self._init_sizes(cfg, int(prog.batch), max_seq)
        if getattr(prog, "config", cfg) != cfg:
            raise ValueError(f"CpuInterpreter: the program was planned for config "
                             f"{prog.config.name!r}, not {cfg.name!r}; plan it for this config")
        weights.check(cfg)
        self.program, self.device = prog, torch.device("cpu")
        self.weights = pack_weights(weights, dtype=dtype, device="cpu")
        self.buffers = Buffers.allocate(cfg, prog, max_seq, device="cpu",
                                        kv_dtype=self.weights.dtype)
        self.queues = [[decode(prog.instructions[sm, i]) for i in range(int(prog.queue_len[sm]))]
                       for sm in range(int(prog.num_sms))]   # [num_sms][queue_len] records
        self.targets = np.asarray(prog.counter_targets, dtype=np.int64)  # [num_counters]
        self._rng = random.Random(seed)
        self.trace: list[tuple[int, int]] = []   # (sm, uid) in execution order, last step
        self.reset()

    def _reset(self) -> None:
        """Empty every sequence: zero counters and KV caches, poison the activations."""
        self.buffers.reset().poison()

    @property
    def position(self) -> int:
        return self.pos

    @property
    def out_tokens(self) -> torch.Tensor:
        """[B] int64 greedy next tokens of the last step, as the ARGMAX instruction wrote them."""
        return self.buffers.out_tokens.clone()

    def _step(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens: int64 [B] -> fp32 logits [B, V]; appends one position to every sequence."""
        buf = self.buffers
        buf.tokens.copy_(tokens)
        buf.pos.fill_(self.pos)
        self._run_queues()
        # As the kernel: each block adds 1 to `done` when its queue ends; the last one
        # (done reaching num_sms * (epoch + 1)) advances the epoch.
        buf.done += len(self.queues)
        buf.epoch += 1
        self._check_counters()
        return buf.logits.clone()

    def _greedy(self, logits: torch.Tensor) -> torch.Tensor:
        return self.out_tokens

    def _run_queues(self) -> None:
        buf, epoch = self.buffers, int(self.buffers.epoch[0])
        counters = buf.counters.numpy()            # shares memory with buf.counters
        needed = wrap32(self.targets * (epoch + 1))
        head = [0] * len(self.queues)
        self.trace = []
        while True:
            live = [sm for sm, q in enumerate(self.queues) if head[sm] < len(q)]
            if not live:
                return
            ready = [sm for sm in live
                     if self._blocked_wait(self.queues[sm][head[sm]], counters, needed) is None]
            if not ready:
                self._record_watchdog(live[0], head[live[0]], counters, needed)
                raise RuntimeError(self._deadlock_report(live, head, counters, needed, epoch))
            sm = self._rng.choice(ready)
            rec = self.queues[sm][head[sm]]
            ops_ref.run(rec, self.weights, buf, self.program)
            if rec["signal"] >= 0:
                buf.counters[rec["signal"]] += 1
            self.trace.append((sm, rec["uid"]))
            head[sm] += 1

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

    def _record_watchdog(self, sm, index, counters, needed) -> None:
        """The kernel's error record: code, SM, queue index, uid, counter, value, needed, op."""
        rec = self.queues[sm][index]
        c = self._blocked_wait(rec, counters, needed)
        self.buffers.error.copy_(torch.tensor(
            [int(Err.WATCHDOG), sm, index, rec["uid"], c, int(counters[c]), int(needed[c]),
             int(rec["op"])], dtype=torch.int32))

    def _deadlock_report(self, live, head, counters, needed, epoch) -> str:
        lines = [f"deadlock in epoch {epoch}: no SM can progress, {len(live)} queues unfinished"]
        for sm in live:
            rec = self.queues[sm][head[sm]]
            c = self._blocked_wait(rec, counters, needed)
            lines.append(f"  SM {sm} queue index {head[sm]} uid {rec['uid']} opcode "
                         f"{Op(rec['op']).name} waits on counter {c}: value {int(counters[c])}, "
                         f"needs {int(needed[c])}")
        return "\n".join(lines)

    def _check_counters(self) -> None:
        epoch, done = int(self.buffers.epoch[0]), int(self.buffers.done[0])
        if done != wrap32(len(self.queues) * epoch):
            raise RuntimeError(f"after epoch {epoch}: done = {done}, expected "
                               f"{len(self.queues)} SMs x epoch {epoch}")
        counters = self.buffers.counters.numpy().astype(np.int64)
        expected = wrap32(self.targets * epoch)
        bad = np.nonzero(counters != expected)[0]
        if len(bad):
            c = int(bad[0])
            raise RuntimeError(f"after epoch {epoch}: {len(bad)} counters off target, first "
                               f"counter {c} = {counters[c]}, expected {expected[c]} "
                               f"(target {self.targets[c]} x epoch {epoch})")
