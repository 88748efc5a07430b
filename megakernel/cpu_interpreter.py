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
from .packing import pack_weights
from .scheduler.isa import NUM_WAITS, Op, decode

ERR_WATCHDOG = 1   # error[0] code of a stuck wait, as csrc/kernel_args.h


def wrap32(x: np.ndarray) -> np.ndarray:
    """Integers wrapped into int32 range (two's complement, as the GPU's int32 arithmetic),
    returned as int64 so later differences do not overflow."""
    return ((np.asarray(x, dtype=np.int64) + 2 ** 31) % 2 ** 32 - 2 ** 31).astype(np.int64)


class CpuInterpreter:
    def __init__(self, cfg: ModelConfig, weights, prog, max_seq: int = 2048, dtype=None,
                 seed: int = 0):
        if not isinstance(max_seq, int) or isinstance(max_seq, bool) or \
                not 1 <= max_seq <= cfg.max_position_embeddings:
            raise ValueError(f"CpuInterpreter: max_seq must be an int in 1.."
                             f"{cfg.max_position_embeddings} (max_position_embeddings of "
                             f"{cfg.name!r}), got {max_seq!r}")
        if getattr(prog, "config", cfg) != cfg:
            raise ValueError(f"CpuInterpreter: the program was planned for config "
                             f"{prog.config.name!r}, not {cfg.name!r}; plan it for this config")
        weights.check(cfg)
        self.config, self.program, self.max_seq = cfg, prog, max_seq
        self.batch = int(prog.batch)
        self.weights = pack_weights(weights, dtype=dtype, device="cpu")
        self.buffers = Buffers.allocate(cfg, prog, max_seq, device="cpu",
                                        kv_dtype=self.weights.dtype)
        self.queues = [[decode(prog.instructions[sm, i]) for i in range(int(prog.queue_len[sm]))]
                       for sm in range(int(prog.num_sms))]   # [num_sms][queue_len] records
        self.targets = np.asarray(prog.counter_targets, dtype=np.int64)  # [num_counters]
        self._rng = random.Random(seed)
        self.trace: list[tuple[int, int]] = []   # (sm, uid) in execution order, last step
        self.reset()

    def reset(self) -> None:
        """Empty every sequence: zero counters and KV caches, poison the activations."""
        self.buffers.reset().poison()
        self.position = 0

    @property
    def out_tokens(self) -> torch.Tensor:
        """[B] int64 greedy next tokens of the last step, as the ARGMAX instruction wrote them."""
        return self.buffers.out_tokens.clone()

    def _check_tokens(self, tokens, batch: int) -> None:
        if (not isinstance(tokens, torch.Tensor) or tokens.dtype != torch.int64
                or tuple(tokens.shape) != (batch,)):
            raise ValueError(f"tokens must be an int64 tensor of shape [{batch}], got "
                             f"{_describe(tokens)}")
        if tokens.device.type != "cpu":
            raise ValueError(f"tokens are on {tokens.device}, the CPU interpreter wants them "
                             "on the CPU; move them with .cpu()")
        bad = (tokens < 0) | (tokens >= self.config.V)
        if bool(bad.any()):
            raise ValueError(f"token ids {tokens[bad].tolist()[:8]} are outside the vocabulary "
                             f"[0, {self.config.V})")

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens: int64 [B] -> fp32 logits [B, V]; appends one position to every sequence."""
        self._check_tokens(tokens, self.batch)
        if self.position >= self.max_seq:
            raise ValueError(f"CpuInterpreter: all {self.max_seq} positions are used; "
                             "construct it with a larger max_seq or call reset()")
        buf = self.buffers
        buf.tokens.copy_(tokens)
        buf.pos.fill_(self.position)
        self._run_queues()
        # As the kernel: each block adds 1 to `done` when its queue ends; the last one
        # (done reaching num_sms * (epoch + 1)) advances the epoch.
        buf.done += len(self.queues)
        buf.epoch += 1
        self._check_counters()
        self.position += 1
        return buf.logits.clone()

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
            [ERR_WATCHDOG, sm, index, rec["uid"], c, int(counters[c]), int(needed[c]),
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

    def generate(self, prompt_ids: torch.Tensor, max_new_tokens: int) -> torch.Tensor:
        """Greedy decode from fresh sequences with the kernel's own ARGMAX.
        prompt_ids: int64 [B, T] -> int64 [B, T + N] (ReferenceModel.generate's contract)."""
        if (not isinstance(prompt_ids, torch.Tensor) or prompt_ids.dim() != 2
                or prompt_ids.shape[0] != self.batch or prompt_ids.shape[1] < 1):
            raise ValueError(f"generate: prompt_ids must be a [batch={self.batch}, T>=1] tensor, "
                             f"got {_describe(prompt_ids)}")
        if not isinstance(max_new_tokens, int) or max_new_tokens < 0:
            raise ValueError(f"generate: max_new_tokens must be an int >= 0, got {max_new_tokens!r}")
        T = prompt_ids.shape[1]
        steps = T + max(max_new_tokens, 1) - 1   # the last new token is returned, not fed
        if steps > self.max_seq:
            raise ValueError(f"generate: {T} prompt + {max_new_tokens} new tokens need {steps} "
                             f"positions, max_seq is {self.max_seq}; raise max_seq")
        self._check_tokens(prompt_ids.reshape(-1), batch=prompt_ids.numel())
        self.reset()
        out = [prompt_ids[:, t] for t in range(T)]
        for t in range(T):
            self.step(prompt_ids[:, t])
        for i in range(max_new_tokens):
            out.append(self.out_tokens)
            if i + 1 < max_new_tokens:
                self.step(out[-1])
        return torch.stack(out, dim=1)


def _describe(x) -> str:
    if isinstance(x, torch.Tensor):
        return f"{x.dtype} tensor of shape {list(x.shape)} on {x.device}"
    return type(x).__name__
