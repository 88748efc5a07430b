"""The tensor-parallel PyTorch baseline (issue 7): the Megatron-TP Llama decode step in plain
PyTorch, one Python process driving N GPUs with NCCL all-reduces between layers, run eagerly
or replayed from CUDA graphs. It is the TP contender the megakernel must beat; with
compute_dtype=torch.float32 it is also the fp32 oracle of models too large for an fp32 copy
(70B: bf16 weights stay bf16, each layer is upcast on the fly, one layer at a time).

Ranks. Rank r runs on devices[r] with shard_weights(weights, tp, r) (megakernel.packing:
its kv groups' q/k/v heads and O-proj columns, its FFN units; embedding, norms and LM head
whole) and a KVCache of the shard config, [L, B, Hkv/tp, S, D]. One step, every rank issued
from this thread in lockstep, each on its device's current stream:

    broadcast [tokens, pos] from rank 0                     (inputs arrive on devices[0])
    x = embed[tokens]                                       [B, d], identical on every rank
    per layer: x += all_reduce(attend(rms_norm(x)) @ wo_r.T)  reference.attend on the shard
               x += all_reduce(swiglu(rms_norm(x)) @ w_down_r.T)
    logits_r = rms_norm(x) @ lm_head[vocab_rows(V, tp)[r]].T, padded to equal widths,
    all_gather -> float32 [B, V] on devices[0]

The layer math is megakernel.reference's own (rms_norm, attend, swiglu), so with a LocalComm
on the CPU the step equals ReferenceModel up to the order of the all-reduce sums.

Communicators: NcclComm(devices) calls torch.cuda.nccl (single-process multi-GPU NCCL, as
DataParallel uses it; one device per rank) on each device's current stream. It sets
NCCL_NVLS_ENABLE=0 unless the caller set it: NVLink multicast (NVLS) must stay off on the
shared machines (shared/DESIGN.md). LocalComm is the CPU-test stand-in: sums in rank order.

CUDA graphs (capture()). Devices talk only through NCCL, never through cross-device copies or
events: a cross-device copy makes each device's stream wait on an event of the other's, and
two per-device captures joined that way fail ("would have resulted in a merge of two
independent capture sequences"). Hence the inputs reach the other ranks by an NCCL broadcast
and the logits come back by an NCCL all-gather. Capture: warm up on one side stream per
device (NCCL communicators, cuBLAS workspaces), then begin one torch.cuda.CUDAGraph per
device on its side stream, run forward() once, end all captures; replay() launches every
device's graph. A failure names the stage and device and keeps the CUDA error.
"""
from __future__ import annotations

import contextlib
import functools
import operator
import os
from typing import Optional

import torch
import torch.nn.functional as F

from megakernel.config import ModelConfig
from megakernel.decoding import StepDecoder
from megakernel.kv_cache import KVCache
from megakernel.packing import shard_tensor
from megakernel.reference import attend, rms_norm, swiglu
from megakernel.rope import rope_tables
from megakernel.scheduler.sharding import shard_config, vocab_rows
from megakernel.tp import keep_failed_graphs
from megakernel.weights import LayerWeights, Weights, random_tensors

from .harness import seed_cache


def random_shards(cfg: ModelConfig, tp: int, seed: int = 0, dtype=torch.bfloat16,
                  devices=None) -> list[Weights]:
    """Rank r's Weights on devices[r], equal to shard_weights(Weights.random(cfg, seed, dtype,
    devices[0]), tp, r), without ever holding the whole model: Weights.random's tensors are
    generated one at a time on devices[0] and each rank keeps a copy of its slice. devices
    default to cuda:0..tp-1 (or the CPU for every rank where there is no GPU)."""
    scfg = shard_config(cfg, tp)                       # ValueError unless tp divides
    if devices is None:
        devices = [f"cuda:{r}" for r in range(tp)] if torch.cuda.is_available() else ["cpu"] * tp
    devices = [torch.device(d) for d in devices]
    if len(devices) != tp:
        raise ValueError(f"random_shards: {len(devices)} devices for tp={tp}; give one per rank")
    items = [[] for _ in range(tp)]
    for layer, field, t in random_tensors(cfg, seed, dtype, devices[0]):
        for r, device in enumerate(devices):
            piece = t if layer is None else shard_tensor(cfg, tp, r, field, t)
            if not (piece is t and t.device == device):   # a slice would pin the whole tensor
                piece = torch.empty(piece.shape, dtype=dtype, device=device).copy_(piece)
            items[r].append((layer, field, piece))
        del t
    return [Weights.assemble(scfg, rank_items) for rank_items in items]


class LocalComm:
    """Collectives over per-rank tensors in plain PyTorch (CPU tests; ranks may share a
    device): sums in rank order, results written back to every rank."""

    def all_reduce(self, xs: list[torch.Tensor]) -> None:
        total = functools.reduce(operator.add, (x.to(xs[0].device) for x in xs))
        for x in xs:
            x.copy_(total)

    def all_gather(self, xs: list[torch.Tensor]) -> list[torch.Tensor]:
        """-> per rank, [tp, *x.shape]: every rank's x in rank order."""
        return [torch.stack([y.to(x.device) for y in xs]) for x in xs]

    def broadcast(self, xs: list[torch.Tensor]) -> None:
        for x in xs[1:]:
            x.copy_(xs[0])


class NcclComm:
    """LocalComm's collectives through torch.cuda.nccl, one rank per CUDA device, each on its
    device's current stream (so a stream being captured captures the NCCL kernel)."""

    def __init__(self, devices):
        self.devices = [torch.device(d) for d in devices]
        if any(d.type != "cuda" or d.index is None for d in self.devices) or len(
                set(self.devices)) != len(self.devices):
            raise ValueError(f"NcclComm needs one distinct, indexed CUDA device per rank, got "
                             f"{[str(d) for d in self.devices]}")
        os.environ.setdefault("NCCL_NVLS_ENABLE", "0")   # read at communicator creation
        import torch.cuda.nccl as nccl
        if not nccl.is_available([torch.empty(1, device=d) for d in self.devices]):
            raise RuntimeError(f"torch {torch.__version__} has no NCCL support")
        self.nccl = nccl

    def _call(self, what: str, fn, xs, *args) -> None:
        streams = [torch.cuda.current_stream(d) for d in self.devices]
        try:
            fn(xs, *args, streams=streams)
        except Exception as e:
            capturing = []
            for d in self.devices:
                with torch.cuda.device(d):
                    capturing += [d.index] if torch.cuda.is_current_stream_capturing() else []
            raise RuntimeError(
                f"NCCL {what} of {xs[0].dtype} {list(xs[0].shape)} over {len(xs)} GPUs failed "
                f"(NCCL {self.nccl.version()}, NCCL_NVLS_ENABLE="
                f"{os.environ.get('NCCL_NVLS_ENABLE')}, streams capturing on devices "
                f"{capturing}): {e}") from e

    def all_reduce(self, xs):
        self._call("all_reduce", self.nccl.all_reduce, xs)

    def all_gather(self, xs):
        outs = [x.new_empty((len(xs), *x.shape)) for x in xs]
        self._call("all_gather", self.nccl.all_gather, xs, outs)
        return outs

    def broadcast(self, xs):
        self._call("broadcast", self.nccl.broadcast, xs)


class TpTorchModel(StepDecoder):
    """shards: rank r's Weights (random_shards or shard_weights), on its device; comm: the
    collectives (NcclComm over the shards' devices, or LocalComm); compute_dtype: None for
    the weights' dtype, or torch.float32 (weights upcast a layer at a time)."""

    def __init__(self, cfg: ModelConfig, shards: list[Weights], comm, batch: int = 1,
                 max_seq: int = 2048, compute_dtype: Optional[torch.dtype] = None):
        self._init_sizes(cfg, batch, max_seq)
        self.tp = len(shards)
        self.shard_config = scfg = shard_config(cfg, self.tp)
        for r, shard in enumerate(shards):
            try:
                shard.check(scfg)
            except ValueError as e:
                raise ValueError(f"TpTorchModel: rank {r}'s shard: {e}") from None
        self.shards, self.comm = shards, comm
        self.devices = [s.device for s in shards]
        self.device = self.devices[0]
        if getattr(comm, "devices", self.devices) != self.devices:
            raise ValueError(f"TpTorchModel: the shards are on {self.devices}, the communicator "
                             f"on {comm.devices}")
        self.dtype = compute_dtype or shards[0].dtype
        self.upcast = self.dtype != shards[0].dtype
        self.caches = [KVCache(scfg, batch, max_seq, self.dtype, d) for d in self.devices]
        self.rope = [rope_tables(cfg, max_seq, d) for d in self.devices]  # cos, sin [S, D/2]
        self.vocab = vocab_rows(cfg.V, self.tp)                          # (row0, rows) per rank
        self.width = max(n for _, n in self.vocab)
        self.heads = [s.lm_head[v0:v0 + n] for s, (v0, n) in zip(shards, self.vocab)]
        self.io = [torch.zeros(batch + 1, dtype=torch.int64, device=d) for d in self.devices]

    def seed_cache(self, k: torch.Tensor, v: torch.Tensor) -> None:
        """k, v: the full model's [L, B, Hkv, P, D] cache contents of positions 0..P-1 (as
        bench.harness.seeded_inputs makes them); each rank copies its kv heads."""
        h = self.shard_config.Hkv
        for r, c in enumerate(self.caches):
            seed_cache(c.k, c.v, k[:, :, r * h:(r + 1) * h], v[:, :, r * h:(r + 1) * h])

    def _reset(self) -> None:
        for c in self.caches:
            c.reset()

    def _step(self, tokens: torch.Tensor) -> torch.Tensor:
        pos_t = torch.tensor([self.pos], dtype=torch.int64, device=self.device)
        return self.forward(tokens, pos_t, kv_len=self.pos + 1)

    def _layer(self, r: int, layer: int) -> LayerWeights:
        lw = self.shards[r].layers[layer]
        return LayerWeights(*(t.to(self.dtype) for t in lw.tensors())) if self.upcast else lw

    @torch.no_grad()
    def forward(self, tokens: torch.Tensor, pos_t: torch.Tensor,
                kv_len: Optional[int] = None) -> torch.Tensor:
        """One decode step of every rank, capture-safe (no host sync, no data-dependent
        control flow). tokens: int64 [B], pos_t: int64 [1], both on devices[0]; kv_len as in
        ReferenceModel.forward (None: all max_seq). Returns float32 logits [B, V] on
        devices[0]."""
        cfg, scfg, comm, dt = self.config, self.shard_config, self.comm, self.dtype
        B, eps, ranks = self.batch, cfg.rms_norm_eps, range(self.tp)
        kv_len = self.max_seq if kv_len is None else kv_len
        self.io[0][:B].copy_(tokens)
        self.io[0][B:].copy_(pos_t)
        comm.broadcast(self.io)
        pos = [io[B:] for io in self.io]
        cos = [c[p] for (c, _), p in zip(self.rope, pos)]                 # [1, D/2]
        sin = [s[p] for (_, s), p in zip(self.rope, pos)]
        visible = [torch.arange(kv_len, device=d) <= p for d, p in zip(self.devices, pos)]
        x = [s.embed[io[:B]].to(dt) for s, io in zip(self.shards, self.io)]  # [B, d]
        for layer in range(cfg.L):
            lws = [self._layer(r, layer) for r in ranks]
            parts = [attend(scfg, lw, self.caches[r], layer,
                            rms_norm(x[r], lw.attn_norm, eps), pos[r], cos[r], sin[r],
                            visible[r]) @ lw.wo.T for r, lw in enumerate(lws)]   # [B, d]
            comm.all_reduce(parts)
            x = [xr + p for xr, p in zip(x, parts)]
            parts = [swiglu(rms_norm(x[r], lw.mlp_norm, eps), lw) @ lw.w_down.T
                     for r, lw in enumerate(lws)]
            comm.all_reduce(parts)
            x = [xr + p for xr, p in zip(x, parts)]
        parts = [F.pad(rms_norm(x[r], s.final_norm.to(dt), eps) @ head.to(dt).T,
                       (0, self.width - head.shape[0]))                   # [B, width]
                 for r, (s, head) in enumerate(zip(self.shards, self.heads))]
        gathered = comm.all_gather(parts)[0]                              # [tp, B, width]
        return torch.cat([gathered[r, :, :n] for r, (_, n) in enumerate(self.vocab)],
                         dim=1).float()

    def capture(self, tokens: torch.Tensor, pos_t: torch.Tensor, kv_len: Optional[int] = None,
                warmup: int = 3, error_mode: str = "relaxed") -> "TpGraph":
        """CUDA graphs of forward(tokens, pos_t, kv_len), one per device (module docstring);
        replay() re-reads tokens and pos_t. error_mode: torch's capture_error_mode. Raises
        RuntimeError naming the stage, the device and the CUDA/NCCL error when it fails."""
        if any(d.type != "cuda" for d in self.devices) or not isinstance(self.comm, NcclComm):
            raise RuntimeError(
                f"TpTorchModel.capture needs every rank on its own CUDA device and an NcclComm "
                f"(ranks on {[str(d) for d in self.devices]}, {type(self.comm).__name__}): "
                "LocalComm's cross-device copies would merge the per-device captures")
        if self.comm.nccl.version() < (2, 9, 6):
            raise RuntimeError(f"NCCL {self.comm.nccl.version()} cannot be captured in a CUDA "
                               "graph; NCCL >= 2.9.6 can")
        streams = [torch.cuda.Stream(d) for d in self.devices]
        for s, d in zip(streams, self.devices):
            s.wait_stream(torch.cuda.current_stream(d))
        graphs = [torch.cuda.CUDAGraph() for _ in self.devices]
        stage, begun, logits = "warm-up (eager forward on the capture streams)", [], None
        try:
            with _current_streams(streams):
                for _ in range(warmup):
                    self.forward(tokens, pos_t, kv_len)
                for d in self.devices:
                    torch.cuda.synchronize(d)
                try:
                    for g, d in zip(graphs, self.devices):
                        stage = f"capture_begin on {d}"
                        with torch.cuda.device(d):
                            g.capture_begin(capture_error_mode=error_mode)
                        begun.append((g, d))
                    stage = (f"forward() under capture (all of {[str(d) for d in self.devices]}"
                             " capturing)")
                    logits = self.forward(tokens, pos_t, kv_len)
                finally:
                    ended = _end_captures(begun)
                    if logits is None:
                        keep_failed_graphs(graphs)
                if ended:
                    stage = "capture_end"
                    raise RuntimeError("; ".join(ended))
        except Exception as e:
            raise RuntimeError(
                f"TpTorchModel.capture (tp={self.tp}, {self.config.name}) failed in {stage}: "
                f"{type(e).__name__}: {e}. The eager forward is unaffected; NCCL_DEBUG=INFO "
                "shows NCCL's side, error_mode='relaxed' allows unsafe CUDA calls during "
                "capture") from e
        return TpGraph(graphs, self.devices, logits)


class TpGraph:
    """The per-device graphs of one captured step. logits: float32 [B, V] on devices[0],
    rewritten by every replay()."""

    def __init__(self, graphs, devices, logits):
        self.graphs, self.devices, self.logits = graphs, devices, logits

    def replay(self) -> None:
        for g, d in zip(self.graphs, self.devices):
            with torch.cuda.device(d):
                g.replay()     # on d's current stream; the NCCL kernels pair up across devices


@contextlib.contextmanager
def _current_streams(streams):
    """Each stream (one per device) is its device's current stream inside the block."""
    with contextlib.ExitStack() as stack:
        for s in streams:
            stack.enter_context(torch.cuda.stream(s))
        yield


def _end_captures(begun) -> list[str]:
    """End every begun capture, even after a failure; -> the errors, one per device."""
    errors = []
    for g, d in begun:
        try:
            with torch.cuda.device(d):
                g.capture_end()
        except Exception as e:        # a failed capture may refuse to end: report, go on
            errors.append(f"capture_end on {d}: {type(e).__name__}: {e}")
    return errors
