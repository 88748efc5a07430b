"""First timing of the megakernel beside the CUDA-graph PyTorch baseline (issue 4): one model,
one batch, both replayed from CUDA graphs, median of CUDA-event times. The full bench with
every contender is `python -m megakernel bench` (issue 5)."""
from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import torch

from megakernel import Decoder, ModelConfig, ReferenceModel, Weights


def time_replays(graph, iters: int, warmup: int = 10) -> float:
    for _ in range(warmup):
        graph.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        graph.replay()
        e.record()
        e.synchronize()
        times.append(s.elapsed_time(e))
    return statistics.median(times)


def copy_bandwidth(nbytes=2 << 30) -> float:
    a = torch.empty(nbytes // 2, dtype=torch.bfloat16, device="cuda").normal_()
    b = torch.empty_like(a)
    for _ in range(3):
        b.copy_(a)
    torch.cuda.synchronize()
    s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    s.record()
    for _ in range(10):
        b.copy_(a)
    e.record()
    e.synchronize()
    return 2 * nbytes * 10 / (s.elapsed_time(e) / 1e3)


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="llama-3.2-1b")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--pos", type=int, default=512)
    p.add_argument("--iters", type=int, default=100)
    p.add_argument("--out", default="bench/results")
    args = p.parse_args()
    cfg = ModelConfig.preset(args.model)
    B, P, max_seq = args.batch, args.pos, args.pos + args.iters + 64
    w = Weights.random(cfg, seed=0, dtype=torch.bfloat16, device="cuda")

    t0 = time.perf_counter()
    dec = Decoder(cfg, w, batch=B, max_seq=max_seq)
    setup_s = time.perf_counter() - t0
    dec.buffers.k_cache.normal_(); dec.buffers.v_cache.normal_()
    dec.buffers.pos.fill_(P); dec.pos = P
    dec.launch_step(torch.randint(0, cfg.V, (B,), device="cuda"))
    dec.runtime.check()
    graph = dec.capture()
    mk_ms = time_replays(graph, args.iters)
    dec.runtime.check()

    ref = ReferenceModel(cfg, w, batch=B, max_seq=P + 1)
    ref.cache.k.normal_(); ref.cache.v.normal_()
    tokens = torch.randint(0, cfg.V, (B,), device="cuda")
    pos_t = torch.tensor([P], device="cuda")
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(3):
            ref.forward(tokens, pos_t)
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        ref.forward(tokens, pos_t)
    ref_ms = time_replays(g, args.iters)

    bw = copy_bandwidth()
    weight_bytes = cfg.weight_bytes(2) + B * cfg.d * 2
    kv_bytes = 2 * cfg.L * B * cfg.Hkv * (P + 1) * cfg.D * 2
    props = torch.cuda.get_device_properties(0)
    rec = dict(
        model=args.model, batch=B, position=P, gpu=props.name, torch=torch.__version__,
        cuda=torch.version.cuda, commit=os.environ.get("MK_COMMIT", "unknown"),
        date=time.strftime("%Y-%m-%d"), num_sms=dec.program.num_sms, policy=dec.program.policy,
        megakernel_ms=mk_ms, cuda_graph_ms=ref_ms, speedup_vs_cuda_graph=ref_ms / mk_ms,
        bytes_per_step=weight_bytes + kv_bytes,
        achieved_TBps=(weight_bytes + kv_bytes) / (mk_ms / 1e3) / 1e12,
        copy_TBps=bw / 1e12,
        fraction_of_copy_bandwidth=(weight_bytes + kv_bytes) / (mk_ms / 1e3) / bw,
        decoder_setup_s=setup_s,
        predicted_ms=getattr(dec.program, "predicted_us", float("nan")) / 1e3)
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, f"first_timing_{args.model}_b{B}.json")
    with open(path, "w") as f:
        json.dump(rec, f, indent=2)
    print(json.dumps(rec, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
