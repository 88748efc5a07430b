"""Plan options under tensor parallelism: the tp=N megakernel step of one model for a few
settings of plan() options (slice counts, attn_splits, reduce_slices, ...) or kernel build
flags (items starting with -D), same weights and KV history, CUDA-graph replayed. Prints one
JSON line per setting; the first setting given is usually the default ("").

    python -m megakernel.bench.tp_options --model llama-3.1-8b --tp 2 \
        --set "" --set attn_splits=16 --set slices=66,attn_splits=16 --set -DMK_RAW_SLOT=0
"""
from __future__ import annotations

import argparse
import json

import torch


def _setting(text: str) -> tuple[tuple[str, ...], dict]:
    """"k=v,...,-DMK_X=1,..." -> (build flags, plan options)."""
    from megakernel.scheduler.plan import parse_options
    items = [t.strip() for t in text.split(",") if t.strip()]
    flags = tuple(t for t in items if t.startswith("-D"))
    return flags, parse_options(",".join(t for t in items if not t.startswith("-D")))


def main() -> None:
    from megakernel import Decoder, ModelConfig
    from megakernel.bench import harness
    from megakernel.bench.tp_baseline import random_shards
    from megakernel.packing import pack_shard
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="llama-3.1-8b")
    ap.add_argument("--tp", type=int, default=2)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--pos", type=int, default=512)
    ap.add_argument("--iters", type=int, default=30)
    ap.add_argument("--set", action="append", default=None, metavar="K=V,...",
                    help="one setting: comma-separated plan options k=v (repeat)")
    args = ap.parse_args()
    settings = [_setting(s) for s in (args.set or [""])]
    cfg = ModelConfig.preset(args.model)
    devices = [torch.device("cuda", r) for r in range(args.tp)]
    shards = random_shards(cfg, args.tp, seed=0, devices=devices)
    packed = [pack_shard(s, args.tp, r, dtype=torch.bfloat16, device=devices[r], release=True)
              for r, s in enumerate(shards)]
    del shards
    tokens, k, v = harness.seeded_inputs(cfg, args.batch, args.pos, devices[0])
    flushes = [harness.L2Flush(d) for d in devices]
    for flags, opts in settings:
        dec = Decoder(cfg, packed, batch=args.batch, max_seq=args.pos + 1, tp=args.tp,
                      build_flags=flags, **opts)
        dec.seed_kv(k, v)
        dec.set_position(args.pos)
        dec.launch_step(tokens)
        dec.runtime.check()
        graph = dec.capture()
        ms = harness.time_steps(graph.replay, args.iters, 5,
                                before=lambda dec=dec: ([f() for f in flushes],
                                                dec.set_position(args.pos)))
        dec.runtime.check()
        p = dec.program.ranks[0]
        print(json.dumps({"model": cfg.name, "tp": args.tp, "batch": args.batch, "options": opts,
                          "build_flags": list(flags),
                          **harness.summarize(ms), "instructions_per_rank": p.num_instructions,
                          "longest_queue": int(p.queue_len.max()),
                          "predicted_ms": dec.program.predicted_us / 1e3}), flush=True)
        del dec, graph


if __name__ == "__main__":
    main()
