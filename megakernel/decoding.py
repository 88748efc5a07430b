"""StepDecoder: the step()/generate()/reset() contract shared by every decoder.

ReferenceModel (eager PyTorch), CpuInterpreter (the Program on the CPU) and Decoder (the
megakernel) differ only in how one step runs; input checks, position bookkeeping and the
greedy loop live here once. Bad input raises ValueError before anything is written.
"""
from __future__ import annotations

import torch

from .profiling import nvtx_range


def describe(x) -> str:
    if isinstance(x, torch.Tensor):
        return f"{x.dtype} tensor of shape {list(x.shape)} on {x.device}"
    return type(x).__name__


class StepDecoder:
    """Subclasses set config, batch, max_seq, device and implement
    _step(tokens [B] int64) -> float32 logits [B, V] (owned by the caller) and _reset().
    They may override _greedy (default: argmax of the logits) and _check (after a step)."""

    pos: int = 0

    def _init_sizes(self, cfg, batch: int, max_seq: int) -> None:
        """Check and set config, batch and max_seq (the constructors' shared arguments)."""
        name = type(self).__name__
        for arg, value in (("batch", batch), ("max_seq", max_seq)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name}: {arg} must be a positive int, got {value!r}")
        if max_seq > cfg.max_position_embeddings:
            raise ValueError(f"{name}: max_seq {max_seq} exceeds the model's "
                             f"max_position_embeddings {cfg.max_position_embeddings}; lower it")
        self.config, self.batch, self.max_seq = cfg, batch, max_seq

    def reset(self) -> None:
        self.pos = 0
        self._reset()

    @torch.no_grad()
    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens: int64 [B], one per sequence at position self.pos -> float32 logits [B, V]."""
        self.check_tokens(tokens)
        if self.pos >= self.max_seq:
            raise ValueError(f"{type(self).__name__}: all {self.max_seq} positions are used; "
                             "construct it with a larger max_seq or call reset()")
        logits = self._step(tokens)
        self.pos += 1
        self._check()
        return logits

    @torch.no_grad()
    @nvtx_range("megakernel.generate")
    def generate(self, prompt_ids: torch.Tensor, max_new_tokens: int) -> torch.Tensor:
        """Greedy decode from fresh sequences. prompt_ids: int64 [B, T] -> int64 [B, T + N]."""
        if (not isinstance(prompt_ids, torch.Tensor) or prompt_ids.dim() != 2
                or prompt_ids.shape[0] != self.batch or prompt_ids.shape[1] < 1):
            raise ValueError(f"generate: prompt_ids must be a [batch={self.batch}, T>=1] tensor, "
                             f"got {describe(prompt_ids)}")
        if not isinstance(max_new_tokens, int) or max_new_tokens < 0:
            raise ValueError(f"generate: max_new_tokens must be an int >= 0, got {max_new_tokens!r}")
        T = prompt_ids.shape[1]
        steps = T + max(max_new_tokens, 1) - 1   # the last new token is returned, not fed
        if steps > self.max_seq:
            raise ValueError(f"generate: {T} prompt + {max_new_tokens} new tokens need {steps} "
                             f"positions, max_seq is {self.max_seq}; raise max_seq")
        self.check_tokens(prompt_ids.reshape(-1), batch=prompt_ids.numel())
        self.reset()
        out = [prompt_ids[:, t] for t in range(T)]
        logits = None
        for t in range(T):
            logits = self._advance(prompt_ids[:, t])
        for i in range(max_new_tokens):
            out.append(self._greedy(logits))
            if i + 1 < max_new_tokens:
                logits = self._advance(out[-1])
        self._check()
        return torch.stack(out, dim=1)

    def check_tokens(self, tokens, batch: int | None = None) -> None:
        batch = self.batch if batch is None else batch
        if (not isinstance(tokens, torch.Tensor) or tokens.dtype != torch.int64
                or tuple(tokens.shape) != (batch,)):
            raise ValueError(f"tokens must be an int64 tensor of shape [{batch}], got "
                             f"{describe(tokens)}")
        if tokens.device != torch.device(self.device):
            raise ValueError(f"tokens are on {tokens.device}, {type(self).__name__} runs on "
                             f"{self.device}; move them with .to({str(self.device)!r})")
        bad = (tokens < 0) | (tokens >= self.config.V)
        if bool(bad.any()):
            raise ValueError(f"token ids {tokens[bad].tolist()[:8]} are outside the vocabulary "
                             f"[0, {self.config.V})")

    # ---- hooks -----------------------------------------------------------------------
    def _advance(self, tokens: torch.Tensor) -> torch.Tensor:
        logits = self._step(tokens)
        self.pos += 1
        return logits

    def _greedy(self, logits: torch.Tensor) -> torch.Tensor:
        return logits.argmax(dim=-1)

    def _check(self) -> None:
        pass

    def _step(self, tokens: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _reset(self) -> None:
        raise NotImplementedError
