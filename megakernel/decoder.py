"""Decoder: the megakernel on the GPU with the step()/generate()/reset() contract.

One kernel launch per step. Tokens and positions live on the device: a step copies the
token ids into the token buffer, launches, and advances the position buffer with a device
add, so the sequence is capturable in a CUDA graph (`capture()`), and generate() feeds the
kernel's own ARGMAX output back without a host round trip.
"""
from __future__ import annotations

import torch

from .decoding import StepDecoder
from .packing import pack_weights
from .profiling import nvtx_range
from .runtime import Runtime, check_supported
from .scheduler import calibration, plan


class Decoder(StepDecoder):
    def __init__(self, cfg, weights, batch: int = 1, max_seq: int = 2048, policy: str = "dag",
                 num_sms: int | None = None, device=None, granularity: str = "chunk",
                 timing: bool = False, watchdog_ms: float | None = None, program=None,
                 ablate: tuple[str, ...] = (), build_flags: tuple[str, ...] = (),
                 **plan_options):
        self._init_sizes(cfg, batch, max_seq)
        check_supported(cfg, batch)
        if not torch.cuda.is_available():
            raise RuntimeError("Decoder runs the megakernel on a CUDA GPU (H100/H200); on this "
                               "machine use CpuInterpreter, which runs the same Program on the CPU")
        self.device = torch.device(device or "cuda")
        if self.device.index is None:
            self.device = torch.device("cuda", torch.cuda.current_device())
        props = torch.cuda.get_device_properties(self.device)
        # The cost model behind "dag" uses this GPU's calibration when one is saved.
        gpu = plan_options.pop("gpu", None) or calibration.for_device(props.name)
        with nvtx_range("megakernel.plan"):
            self.program = program or plan(cfg, batch=batch,
                                           num_sms=num_sms or props.multi_processor_count,
                                           policy=policy, granularity=granularity, gpu=gpu,
                                           **plan_options)
        with nvtx_range("megakernel.pack"):
            self.packed = pack_weights(weights, dtype=torch.bfloat16, device=self.device)
        self.runtime = Runtime(self.packed, self.program, max_seq, timing=timing,
                               watchdog_ms=watchdog_ms, ablate=ablate, build_flags=build_flags)
        self.buffers = self.runtime.buffers
        self.pos = 0

    def _step(self, tokens: torch.Tensor) -> torch.Tensor:
        with nvtx_range("megakernel.step"):
            self.launch_step(tokens)
            return self.buffers.logits.clone()

    def launch_step(self, tokens: torch.Tensor | None = None) -> None:
        """Enqueue one step (no checks, no sync): tokens (None: the last step's greedy
        tokens) -> token buffer, kernel, position += 1. What a CUDA graph captures."""
        buf = self.buffers
        buf.tokens.copy_(buf.out_tokens if tokens is None else tokens, non_blocking=True)
        self.runtime.launch()
        buf.pos.add_(1)

    def _greedy(self, logits: torch.Tensor) -> torch.Tensor:
        return self.buffers.out_tokens.clone()

    def _check(self) -> None:
        self.runtime.check()

    def _reset(self) -> None:
        self.runtime.reset()

    def capture(self, tokens: torch.Tensor | None = None) -> torch.cuda.CUDAGraph:
        """A CUDA graph of one step: greedy feedback (tokens <- last out_tokens) by default, or
        the fixed device tensor `tokens` every replay. Replaying advances the sequences; the
        caller keeps `pos` in step (see bench)."""
        stream = torch.cuda.Stream(self.device)
        stream.wait_stream(torch.cuda.current_stream(self.device))
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.stream(stream), torch.cuda.graph(graph, stream=stream):
            self.launch_step(tokens)
        torch.cuda.current_stream(self.device).wait_stream(stream)
        return graph
