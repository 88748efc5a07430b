"""The contenders of the bench, each turned into (step, before) for harness.time_steps, plus
the megakernel's correctness spot check and the torch.compile child process.

    eager       ReferenceModel.forward in bf16 (the user's named baseline): ~100 kernels
                launched from Python per step, position as a device tensor
    cuda_graph  the same forward captured once in a CUDA graph and replayed
    compile     torch.compile(forward, mode="reduce-overhead") in a CHILD process
                (bench/compile_worker.py) with a deadline: a slow or hung compile is killed
                and the contender skipped with a note, leaving the bench's process clean.
                The child rebuilds the same weights (seed 0) and inputs; their checksum is
                compared with the parent's
    megakernel  Decoder.capture() replayed, the position reset to `pos` before each step
All read keys and values of positions 0..pos (the caches are seeded alike) and write
position pos, so every contender times the same step.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import torch

from megakernel import Decoder, ReferenceModel

from .harness import seed_cache

CONTENDERS = ("eager", "cuda_graph", "compile", "megakernel")


def eager(ref: ReferenceModel, tokens, pos_t):
    return lambda: ref.forward(tokens, pos_t)


def cuda_graph(ref: ReferenceModel, tokens, pos_t):
    """-> (graph, step). Warm-up on a side stream first, as CUDA graph capture wants."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            ref.forward(tokens, pos_t)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        ref.forward(tokens, pos_t)
    return graph, graph.replay


def megakernel(cfg, weights, batch: int, pos: int, tokens, k, v, **decoder_options):
    """-> (decoder, step, before): one greedy-feedback step per replay at position pos."""
    dec = Decoder(cfg, weights, batch=batch, max_seq=pos + 1, **decoder_options)
    seed_cache(dec.buffers.k_cache, dec.buffers.v_cache, k, v)
    dec.buffers.pos.fill_(pos)
    dec.pos = pos
    dec.launch_step(tokens)           # out_tokens valid before the graph feeds them back
    dec.runtime.check()
    graph = dec.capture()
    return dec, graph.replay, lambda: dec.buffers.pos.fill_(pos)


def fp32_fits(cfg, device, margin: float = 1.1) -> tuple[bool, str]:
    """Whether an fp32 copy of the weights fits in the device memory free now."""
    need = cfg.num_params() * 4
    free = torch.cuda.mem_get_info(device)[0] + (torch.cuda.memory_reserved(device)
                                                 - torch.cuda.memory_allocated(device))
    return need * margin < free, (f"an fp32 copy of {cfg.name} needs {need / 1e9:.1f} GB, "
                                  f"{free / 1e9:.1f} GB are free")


def logit_errors(cfg, weights, dec, ref_bf16, tokens, pos: int, k, v) -> dict:
    """One step at `pos` of the megakernel and of bf16 eager against an fp32 reference on the
    same seeded cache: max |logit error| / max |fp32 logit| each, and whether the megakernel
    is within 2x bf16 eager's error + 2e-3 (the end-to-end test's criterion)."""
    pos_t = torch.tensor([pos], device=tokens.device)
    dec.buffers.pos.fill_(pos)
    dec.launch_step(tokens)
    dec.runtime.check()
    got = dec.buffers.logits.clone()
    bf16 = ref_bf16.forward(tokens, pos_t)
    fits, why = fp32_fits(cfg, tokens.device)
    if not fits:
        return {"ok": None, "note": f"skipped: {why}; the fp32 check runs on smaller models"}
    try:
        fp = ReferenceModel(cfg, weights.to(dtype=torch.float32), batch=tokens.shape[0],
                            max_seq=pos + 1)
        seed_cache(fp.cache.k, fp.cache.v, k, v)
        want = fp.forward(tokens, pos_t)
        del fp
    except torch.cuda.OutOfMemoryError:
        return {"ok": None, "note": f"skipped: out of memory for the fp32 copy ({why})"}
    scale = want.abs().max()
    err_mk = ((got - want).abs().max() / scale).item()
    err_bf = ((bf16 - want).abs().max() / scale).item()
    return {"megakernel": err_mk, "bf16_eager": err_bf, "ok": err_mk <= 2 * err_bf + 2e-3}


def run_child(argv: list[str], timeout_s: float) -> tuple[dict | None, str]:
    """Run a Python module in a new process group; -> (its last stdout line as JSON, note).
    Past timeout_s the whole group (inductor's compile workers too) is killed."""
    import megakernel
    env = dict(os.environ)
    root = str(Path(megakernel.__file__).resolve().parent.parent)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
    proc = subprocess.Popen([sys.executable, *argv], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        return None, f"skipped: not done within {timeout_s:.0f} s (child process killed)"
    lines, errors = out.strip().splitlines(), err.strip().splitlines()
    if proc.returncode != 0 or not lines:
        print("\n".join(f"  child: {line}" for line in errors[-15:]), file=sys.stderr)
        return None, f"failed (exit {proc.returncode}): {(errors or ['no output'])[-1][:200]}"
    return json.loads(lines[-1]), ""


def compile_child(model: str, batch: int, pos: int, iters: int, warmup: int,
                  timeout_s: float) -> tuple[dict | None, str]:
    return run_child(["-m", "megakernel.bench.compile_worker", "--model", model,
                      "--batch", str(batch), "--pos", str(pos), "--iters", str(iters),
                      "--warmup", str(warmup)], timeout_s)
