"""Where a megakernel step goes, in one device call: the same plan with and without its
dependency waits (without them the kernel only streams weights and computes: its ceiling),
policy x granularity, and one step's per-instruction timing (npz) for offline analysis."""
from __future__ import annotations

import argparse
import copy
import json
import os
import time

import numpy as np
import torch

from megakernel import Decoder, ModelConfig, Weights
import statistics

from bench.harness import time_steps


def seeded(cfg, w, batch, pos, **kw):
    dec = Decoder(cfg, w, batch=batch, max_seq=pos + 400, **kw)
    dec.buffers.k_cache.normal_(); dec.buffers.v_cache.normal_()
    dec.buffers.pos.fill_(pos); dec.pos = pos
    dec.launch_step(torch.randint(0, cfg.V, (batch,), device="cuda"))
    dec.runtime.check()
    return dec


def ms(dec, iters=60):
    """Graph-replay ms per step with fixed input tokens (a no-wait plan's greedy output is
    garbage, so nothing is fed back)."""
    g = dec.capture(torch.randint(0, dec.config.V, (dec.batch,), device="cuda"))
    out = statistics.median(time_steps(g.replay, iters, warmup=10))
    dec.runtime.check()
    return out


def without_waits(prog):
    p = copy.copy(prog)
    p.instructions, p.claim = prog.instructions.copy(), prog.claim.copy()
    p.instructions[..., 3:7] = 0
    p.claim[..., 3:7] = 0
    return p


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="out")
    ap.add_argument("--pos", type=int, default=512)
    ap.add_argument("--ring", action="store_true",
                    help="also time the 4-slot ring build (MK_RAW_SLOT=0)")
    ap.add_argument("--sweep", action="store_true", help="only the plan-option sweep")
    args = ap.parse_args()
    res = {}
    cfg = ModelConfig.preset("llama-3.2-1b")
    w = Weights.random(cfg, seed=0, dtype=torch.bfloat16, device="cuda")
    if args.sweep:
        for pages in (0, 16):
            flags = (f"-DMK_L2_PREFETCH_PAGES={pages}",)
            res[f"1b_b1 L2_PREFETCH_PAGES={pages}"] = ms(seeded(cfg, w, 1, args.pos,
                                                                build_flags=flags))
        res["1b_b1 granularity=layer"] = ms(seeded(cfg, w, 1, args.pos, granularity="layer"))
        res["1b_b1 attn_splits=8"] = ms(seeded(cfg, w, 1, args.pos, attn_splits=8))
        args.ring = False
    base = seeded(cfg, w, 1, args.pos)
    nowait = without_waits(base.program)
    res["1b_b1"] = ms(base)
    for ablate in ((), ("no_compute",), ("no_load",), ("no_compute", "no_load")):
        tag = "+".join(ablate) or "all_on"
        res[f"1b_b1_nowait_{tag}"] = ms(seeded(cfg, w, 1, args.pos, program=nowait,
                                               ablate=ablate))
    res["1b_b1_no_prefetch"] = ms(seeded(cfg, w, 1, args.pos, ablate=("no_prefetch",)))
    for flags in ([("-DMK_RAW_SLOT=0",)] if args.ring else []):
        tag = " ".join(f[5:] for f in flags)
        res[f"1b_b1 {tag}"] = ms(seeded(cfg, w, 1, args.pos, build_flags=flags))
    for B in (8, 16):
        res[f"1b_b{B}"] = ms(seeded(cfg, w, B, args.pos))
    traced = seeded(cfg, w, 1, args.pos, timing=True)
    traced.runtime.timing.zero_()
    traced.launch_step(None)
    traced.runtime.check()
    np.savez_compressed(os.path.join(args.out, "trace_1b_b1.npz"),
                        timing=traced.runtime.timing.cpu().numpy(),
                        instructions=traced.program.instructions,
                        queue_len=traced.program.queue_len)
    del base, traced, w
    torch.cuda.empty_cache()
    cfg8 = ModelConfig.preset("llama-3.1-8b")
    w8 = Weights.random(cfg8, seed=0, dtype=torch.bfloat16, device="cuda")
    res["8b_b1"] = ms(seeded(cfg8, w8, 1, args.pos), 30)
    res["gpu"] = torch.cuda.get_device_name()
    res["date"] = time.strftime("%Y-%m-%d %H:%M")
    with open(os.path.join(args.out, "diagnose.json"), "w") as f:
        json.dump(res, f, indent=1)
    for k, v in res.items():
        print(f"{k:24s} {v:.3f}" if isinstance(v, float) else f"{k:24s} {v}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
