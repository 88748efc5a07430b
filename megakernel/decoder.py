"""Decoder: the megakernel on the GPU with the step()/generate()/reset() contract.

One kernel launch per step. Tokens and positions live on the device: a step copies the
token ids into the token buffer, launches, and advances the position buffer with a device
add, so the sequence is capturable in a CUDA graph (`capture()`), and generate() feeds the
kernel's own ARGMAX output back without a host round trip.

tp=N runs one megakernel per GPU (megakernel.tp): `devices` lists each rank's GPU (default
cuda:0..N-1; ranks may share a GPU, each then planned for its share of the SMs), `weights`
is the whole model's Weights, or per rank its shard Weights or PackedWeights (pack_shard;
for models no device holds whole), and comm="nccl" selects the NCCL-between-launches ablation. `buffers` are rank 0's
(every rank ends a step with the same logits and tokens).
"""
from __future__ import annotations

import torch

from .decoding import StepDecoder
from .packing import PackedWeights, pack_shard, pack_weights
from .profiling import nvtx_range
from .runtime import Runtime, check_supported, option_build_flags
from .scheduler import calibration, plan


class Decoder(StepDecoder):
    def __init__(self, cfg, weights, batch: int = 1, max_seq: int = 2048, policy: str = "dag",
                 num_sms: int | None = None, device=None, granularity: str = "chunk",
                 timing: bool = False, watchdog_ms: float | None = None, program=None,
                 ablate: tuple[str, ...] = (), build_flags: tuple[str, ...] = (),
                 tp: int = 1, devices=None, comm: str = "peer", variant: str = "auto",
                 **plan_options):
        self._init_sizes(cfg, batch, max_seq)
        check_supported(cfg, batch)
        if not torch.cuda.is_available():
            raise RuntimeError("Decoder runs the megakernel on a CUDA GPU (H100/H200); on this "
                               "machine use CpuInterpreter, which runs the same Program on the CPU")
        self.tp = tp
        self.devices = self._devices(tp, device, devices)
        self.device = self.devices[0]
        props = torch.cuda.get_device_properties(self.device)
        if num_sms is None:   # ranks sharing a GPU split its SMs
            num_sms = min(torch.cuda.get_device_properties(d).multi_processor_count
                          // self.devices.count(d) for d in self.devices)
        # The cost model behind "dag" uses this GPU's calibration when one is saved.
        gpu = plan_options.pop("gpu", None) or calibration.for_device(props.name)
        with nvtx_range("megakernel.plan"):
            self.program = program or plan(cfg, batch=batch, num_sms=num_sms, policy=policy,
                                           granularity=granularity, gpu=gpu, tp=tp,
                                           **plan_options)
        build_flags = (*build_flags, *option_build_flags(self.program))
        options = dict(watchdog_ms=watchdog_ms, ablate=ablate, build_flags=build_flags)
        with nvtx_range("megakernel.pack"):
            if tp == 1:
                self.packed = pack_weights(weights, dtype=torch.bfloat16, device=self.device)
            else:
                self.packed = [self._pack_rank(weights, r) for r in range(tp)]
        if tp == 1:
            self.runtime = Runtime(self.packed, self.program, max_seq, timing=timing,
                                   variant=variant, **options)
        else:
            if variant == "b1":
                raise ValueError("variant='b1' runs one GPU's program (tp = 1)")
            from .tp import TpRuntime
            self.runtime = TpRuntime(self.packed, self.program, max_seq, comm=comm,
                                     timing=timing, **options)
        self.buffers = self.runtime.buffers
        self.pos = 0

    @staticmethod
    def _devices(tp: int, device, devices) -> list[torch.device]:
        if tp < 1:
            raise ValueError(f"tp must be >= 1, got {tp}")
        if devices is None:
            if tp == 1:
                devices = [device or "cuda"]
            elif torch.cuda.device_count() < tp:
                raise ValueError(f"tp={tp} needs {tp} GPUs, {torch.cuda.device_count()} are "
                                 "visible; pass devices=[...] to place several ranks on one GPU")
            else:
                devices = [f"cuda:{r}" for r in range(tp)]
        if len(devices) != tp:
            raise ValueError(f"tp={tp} needs one device per rank, got {len(devices)}")
        out = [torch.device(d) for d in devices]
        return [torch.device("cuda", torch.cuda.current_device()) if d.index is None else d
                for d in out]

    def _pack_rank(self, weights, r: int):
        dev = self.devices[r]
        if isinstance(weights, (list, tuple)):
            if len(weights) != self.tp:
                raise ValueError(f"tp={self.tp}: got {len(weights)} weight shards")
            if isinstance(weights[r], PackedWeights):     # packed already (pack_shard)
                if weights[r].device != dev or weights[r].dtype != torch.bfloat16:
                    raise ValueError(f"rank {r}'s packed shard is {weights[r].dtype} on "
                                     f"{weights[r].device}; the rank runs bf16 on {dev}")
                return weights[r]
            return pack_shard(weights[r], self.tp, r, dtype=torch.bfloat16, device=dev)
        return pack_weights(weights, dtype=torch.bfloat16, device=dev, tp=self.tp, rank=r)

    def _step(self, tokens: torch.Tensor) -> torch.Tensor:
        with nvtx_range("megakernel.step"):
            self.launch_step(tokens)
            return self.buffers.logits.clone()

    def launch_step(self, tokens: torch.Tensor | None = None) -> None:
        """Enqueue one step (no checks, no sync): tokens (None: the last step's greedy
        tokens) -> token buffer, kernel, position += 1. What a CUDA graph captures."""
        if self.tp > 1:
            self.runtime.launch_step(tokens)
            return
        buf = self.buffers
        buf.tokens.copy_(buf.out_tokens if tokens is None else tokens, non_blocking=True)
        self.runtime.launch()
        buf.pos.add_(1)

    def rank_buffers(self) -> list:
        """Every rank's Buffers (one under tp=1)."""
        return [self.buffers] if self.tp == 1 else [rt.buffers for rt in self.runtime.ranks]

    def seed_kv(self, k: torch.Tensor, v: torch.Tensor) -> None:
        """Write a whole-model KV history, k and v [L, B, Hkv, P, D], into positions 0..P-1
        of every rank's cache (rank r holds kv heads r*Hkv/tp .. (r+1)*Hkv/tp - 1)."""
        P, n = k.shape[3], self.config.Hkv // self.tp
        for r, buf in enumerate(self.rank_buffers()):
            heads = slice(r * n, (r + 1) * n)
            buf.k_cache[:, :, :, :P].copy_(k[:, :, heads])
            buf.v_cache[:, :, :, :P].copy_(v[:, :, heads])

    def set_position(self, pos: int) -> None:
        """Every sequence continues at position `pos` (device buffers, in stream order)."""
        if self.tp == 1:
            self.buffers.pos.fill_(pos)
        else:
            self.runtime.fill_position(pos)
        self.pos = pos

    def _greedy(self, logits: torch.Tensor) -> torch.Tensor:
        return self.buffers.out_tokens.clone()

    def _check(self) -> None:
        self.runtime.check()

    def _reset(self) -> None:
        self.runtime.reset()

    def capture(self, tokens: torch.Tensor | None = None) -> torch.cuda.CUDAGraph:
        """A CUDA graph of one step: greedy feedback (tokens <- last out_tokens) by default, or
        the fixed device tensor `tokens` every replay. Replaying advances the sequences; the
        caller keeps `pos` in step (see bench). Under tp > 1 a TpGraph (same replay())."""
        if self.tp > 1:
            return self.runtime.capture(tokens)
        stream = torch.cuda.Stream(self.device)
        stream.wait_stream(torch.cuda.current_stream(self.device))
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.stream(stream), torch.cuda.graph(graph, stream=stream):
            self.launch_step(tokens)
        torch.cuda.current_stream(self.device).wait_stream(stream)
        return graph
