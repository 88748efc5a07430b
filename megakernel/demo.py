"""`python -m megakernel demo`: the CPU main job. Random weights for a small preset, a plan
per scheduling policy, and the CPU interpreter against the fp32 ReferenceModel for a few
greedy decode steps. Prints one row per policy; exits non-zero when any row fails (relative
error above REL_TOL, or greedy tokens that differ)."""
from __future__ import annotations

import argparse
import time

import torch

from .config import ModelConfig
from .cpu_interpreter import CpuInterpreter
from .reference import ReferenceModel
from .scheduler import plan
from .scheduler.assign import POLICIES
from .weights import Weights

REL_TOL = 1e-5   # fp32 against fp32: only the summation order differs


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="tiny", help="preset name (default: tiny)")
    parser.add_argument("--batch", type=int, default=2, help="sequences per step (default: 2)")
    parser.add_argument("--num-sms", type=int, default=8, help="SM queues to plan (default: 8)")
    parser.add_argument("--steps", type=int, default=8, help="decode steps (default: 8)")
    parser.add_argument("--seed", type=int, default=0, help="weights, prompt and interleaving")
    parser.add_argument("--policy", choices=POLICIES, action="append",
                        help="policy to run, repeatable (default: all)")


def compare(cfg, weights, prog, steps: int, seed: int) -> tuple[float, bool]:
    """(max relative error of the logits, greedy tokens equal) over `steps` greedy steps."""
    ref = ReferenceModel(cfg, weights, batch=prog.batch, max_seq=steps, dtype=torch.float32)
    cpu = CpuInterpreter(cfg, weights, prog, max_seq=steps, dtype=torch.float32, seed=seed)
    tokens = torch.randint(0, cfg.V, (prog.batch,), generator=torch.Generator().manual_seed(seed))
    worst, same = 0.0, True
    for _ in range(steps):
        expected = ref.step(tokens)
        logits = cpu.step(tokens)
        worst = max(worst, float((logits - expected).abs().max() / expected.abs().max()))
        tokens = expected.argmax(-1)
        same &= torch.equal(cpu.out_tokens, tokens)
    return worst, same


def main(args) -> int:
    cfg = ModelConfig.preset(args.model)
    weights = Weights.random(cfg, seed=args.seed, dtype=torch.float32, device="cpu")
    print(f"{cfg.name}: batch {args.batch}, {args.num_sms} SMs, {args.steps} steps, "
          f"CPU interpreter vs ReferenceModel in fp32 (pass: rel err <= {REL_TOL:g}, tokens equal)")
    print(f"{'policy':<8}{'instructions':>13}{'counters':>10}{'max rel err':>13}"
          f"{'tokens equal':>14}{'seconds':>9}  result")
    failed = 0
    for policy in args.policy or POLICIES:
        start = time.perf_counter()
        prog = plan(cfg, batch=args.batch, num_sms=args.num_sms, policy=policy)
        err, same = compare(cfg, weights, prog, args.steps, args.seed)
        ok = err <= REL_TOL and same
        failed += not ok
        print(f"{policy:<8}{prog.num_instructions:>13}{prog.num_counters:>10}{err:>13.2e}"
              f"{'yes' if same else 'NO':>14}{time.perf_counter() - start:>9.2f}  "
              f"{'ok' if ok else 'FAIL'}")
    return 1 if failed else 0
