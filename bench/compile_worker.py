"""The torch.compile contender, run as a child process by the bench (baselines.compile_child)
so a slow or hung compile can be killed. Builds the same weights (seed 0) and inputs as the
parent, compiles ReferenceModel.forward with mode="reduce-overhead" (CUDA graphs), times it
like every contender and prints ONE JSON line on stdout: per-step ms, compile seconds, the
weights' checksum, and the compiled step's max relative logit difference from eager.

Every weight and cache tensor is marked a static address: dynamo lifts tensors held by plain
objects as graph inputs, and CUDA graphs would otherwise copy each into a static buffer
before every replay (and skip graphs altogether for the mutated KV cache).
"""
from __future__ import annotations

import argparse
import json
import sys
import time

import torch

from megakernel import ModelConfig, ReferenceModel, Weights

from .harness import L2Flush, fingerprint, require_gpu, seed_cache, seeded_inputs, time_steps


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True)
    p.add_argument("--batch", type=int, required=True)
    p.add_argument("--pos", type=int, required=True)
    p.add_argument("--iters", type=int, default=100)
    p.add_argument("--warmup", type=int, default=10)
    args = p.parse_args(argv)
    try:
        device = require_gpu("the torch.compile contender")
    except RuntimeError as e:
        print(e, file=sys.stderr)
        return 2
    cfg = ModelConfig.preset(args.model)
    w = Weights.random(cfg, seed=0, dtype=torch.bfloat16, device=device)
    tokens, k, v = seeded_inputs(cfg, args.batch, args.pos, device)
    ref = ReferenceModel(cfg, w, batch=args.batch, max_seq=args.pos + 1)
    seed_cache(ref.cache.k, ref.cache.v, k, v)
    pos_t = torch.tensor([args.pos], device=device)
    want = ref.forward(tokens, pos_t)
    for t in (*w.tensors(), ref.cache.k, ref.cache.v, ref.cos, ref.sin):
        torch._dynamo.mark_static_address(t)
    compiled = torch.compile(ref.forward, mode="reduce-overhead")

    def step():
        torch.compiler.cudagraph_mark_step_begin()
        return compiled(tokens, pos_t)

    t0 = time.perf_counter()
    for _ in range(3):                # compile, record the graph, first replay
        got = step()
    diff = ((got - want).abs().max() / want.abs().max()).item()
    torch.cuda.synchronize()
    compile_s = time.perf_counter() - t0
    print(f"compiled in {compile_s:.1f} s", file=sys.stderr)
    ms = time_steps(step, args.iters, args.warmup, before=L2Flush(device))
    print(json.dumps({"ms": ms, "compile_s": compile_s, "rel_diff_vs_eager": diff,
                      "fingerprint": fingerprint(w)}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
