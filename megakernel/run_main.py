"""`python -m megakernel run`: the main job. On a machine with an sm_90 GPU it runs the
megakernel (Decoder) against the eager reference: logit error vs the fp32 oracle next to bf16
eager's, greedy tokens vs bf16 eager, and the per-step time of a CUDA-graph replay. On any
other machine it runs the CPU demo (the Program through the CPU interpreter)."""
from __future__ import annotations

import argparse
import time

import torch

from . import demo


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default=None,
                        help="preset (default: llama-3.2-1b on a GPU, tiny on the CPU)")
    parser.add_argument("--batch", type=int, default=None)
    parser.add_argument("--steps", type=int, default=None, help="decode steps")
    parser.add_argument("--cpu", action="store_true", help="run the CPU demo even with a GPU")


def gpu_available() -> bool:
    return torch.cuda.is_available() and torch.cuda.get_device_capability() == (9, 0)


def main(args) -> int:
    if args.cpu or not gpu_available():
        why = "asked for" if args.cpu else "no sm_90 GPU here"
        print(f"megakernel run: CPU path ({why}): the Program through the CPU interpreter")
        return demo.main(argparse.Namespace(
            model=args.model or "tiny", batch=args.batch or 2, num_sms=8,
            steps=args.steps or 8, seed=0, policy=None))
    return gpu_main(args.model or "llama-3.2-1b", args.batch or 1, args.steps or 32)


def gpu_main(model: str, batch: int, steps: int) -> int:
    from . import Decoder, ModelConfig, ReferenceModel, Weights
    cfg = ModelConfig.preset(model)
    print(f"megakernel run: {cfg.name} batch {batch} on {torch.cuda.get_device_name()}")
    w = Weights.random(cfg, seed=0, dtype=torch.bfloat16, device="cuda")
    dec = Decoder(cfg, w, batch=batch, max_seq=steps + 64)
    print(dec.program.summary())
    bf = ReferenceModel(cfg, w, batch=batch, max_seq=steps + 8)
    fp = ReferenceModel(cfg, w, batch=batch, max_seq=steps + 8, dtype=torch.float32)
    prompt = torch.randint(0, cfg.V, (batch, 4), device="cuda",
                           generator=torch.Generator("cuda").manual_seed(0))
    err_mk = err_bf = 0.0
    for t in range(4):
        ref = fp.step(prompt[:, t])
        scale = ref.abs().max().item()
        err_mk = max(err_mk, ((dec.step(prompt[:, t]) - ref).abs().max() / scale).item())
        err_bf = max(err_bf, ((bf.step(prompt[:, t]) - ref).abs().max() / scale).item())
    ok_err = err_mk <= 2 * err_bf + 2e-3
    mk_tokens = dec.generate(prompt, steps)
    bf_tokens = bf.generate(prompt, steps)
    same = int((mk_tokens == bf_tokens).all(0).long().cumprod(0).sum()) - prompt.shape[1]
    dec.reset()                      # graph replays advance the sequences: start from position 0
    graph = dec.capture()
    for _ in range(5):
        graph.replay()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(20):
        graph.replay()
    torch.cuda.synchronize()
    ms = (time.perf_counter() - t0) / 20 * 1e3
    dec.runtime.check()
    print(f"max relative logit error vs fp32: megakernel {err_mk:.2e}, bf16 eager {err_bf:.2e} "
          f"({'ok' if ok_err else 'FAIL'}: megakernel <= 2 x bf16 + 2e-3)")
    print(f"greedy tokens equal to bf16 eager for the first {same} of {steps} steps")
    print(f"CUDA-graph replay: {ms:.3f} ms per step (`python -m megakernel bench` for the "
          "full comparison)")
    return 0 if ok_err else 1
