"""`python -m megakernel bench --tp N`: tensor parallelism over N GPUs of one host.

Per (model, batch), all in one process and on the same weights (random_shards, seed 0) and
seeded KV history:
    eager            the Megatron-TP PyTorch step (bench/tp_baseline.py), NCCL all-reduces
                     between layers, called from Python
    cuda_graph       the same captured (one CUDA graph per GPU) and replayed, in a CHILD
                     process with a deadline after the other variants of the model (the
                     capture of llama-3.1-70b hung once past 290 s on two H200s: a hang must
                     not take the run's other numbers with it)
    megakernel       one megakernel per GPU, in-kernel peer stores and counters, replayed
                     from CUDA graphs
    megakernel_nccl  the ablation: the same rank Programs cut into 2L + 2 launches with NCCL
                     collectives between them (scheduler/phases.py), replayed from CUDA graphs
                     (or launched eagerly, with a note, if the capture fails)
    megakernel_fold  the ablation of folding: megakernel planned with fold=True (the
                     residual's readers sum the tp partials, no RESID_SUM stages; lowering.py)
    megakernel_reduce1  the ablation of the split reduce: megakernel planned with
                     reduce_slices=1 (one ATTN_REDUCE per kv group, as before the split)
    megakernel_fused megakernel planned with fuse_reduce=True (no ATTN_REDUCE stage: the
                     last ATTN split of each group merges it)
Correctness: one step of each megakernel variant against the fp32 TP reference (the same
shards upcast a layer at a time: TpTorchModel(compute_dtype=float32)), next to bf16 eager's
error, as the single-GPU bench does.

Memory: llama-3.1-70b at tp=2 fills half an H200 per rank with bf16 shards; the baselines run
first on the unpacked shards, which are then packed layer by layer into the kernel layout
(pack_shard(release=True)), so the model is never held twice.
"""
from __future__ import annotations

import gc
import time

import torch

VARIANTS = ("eager", "cuda_graph", "megakernel", "megakernel_nccl", "megakernel_fold",
            "megakernel_reduce1", "megakernel_fused")
# megakernel variants: name -> (comm, plan options)
MK_VARIANTS = {"megakernel": ("peer", {}), "megakernel_nccl": ("nccl", {}),
               "megakernel_fold": ("peer", {"fold": True}),
               "megakernel_reduce1": ("peer", {"reduce_slices": 1}),
               "megakernel_fused": ("peer", {"fuse_reduce": True})}
CAPTURE_MODES = ("relaxed", "global")   # relaxed: the only mode that captures 2 GPUs at once


def bytes_per_gpu(cfg, tp: int, batch: int, pos: int) -> tuple[int, int]:
    """(weight bytes, KV bytes) one GPU must read per step: 1/tp of the weights (the norms,
    replicated, are negligible) and its kv heads of positions 0..pos."""
    from megakernel.bench.harness import bytes_read
    weights, kv = bytes_read(cfg, batch, pos)
    return weights // tp, kv // tp


def run_tp(cfgs, batches, tp: int, args, log, on_record=None) -> dict:
    """on_record(run): called after every (model, batch), e.g. to save partial results."""
    from megakernel.bench import harness
    from megakernel.bench.tp_baseline import random_shards
    if torch.cuda.device_count() < tp:
        raise RuntimeError(f"--tp {tp} needs {tp} GPUs, {torch.cuda.device_count()} visible")
    devices = [torch.device("cuda", r) for r in range(tp)]
    copy, read = harness.bandwidth(devices[0])
    log(f"copy bandwidth of GPU 0: {copy / 1e12:.2f} TB/s (read + write), read {read / 1e12:.2f}")
    flushes = [harness.L2Flush(d) for d in devices]

    def flush():
        for f in flushes:
            f()

    run = {"schema": "megakernel-bench/1", **harness.stamp(devices[0]), "tp": tp,
           "gpus": [torch.cuda.get_device_name(d) for d in devices], "position": args.pos,
           "iters": args.iters, "warmup": args.warmup, "copy_TBps": copy / 1e12,
           "read_TBps": read / 1e12, "method": method(args, tp), "notes": [], "records": []}
    for cfg in cfgs:
        try:
            t0 = time.perf_counter()
            shards = random_shards(cfg, tp, seed=0, dtype=torch.bfloat16, devices=devices)
            log(f"{cfg.name}: tp={tp} shards generated in {time.perf_counter() - t0:.0f} s")
            for i, batch in enumerate(batches):
                last = i == len(batches) - 1
                recs, shards = bench_shape(cfg, shards, batch, tp, devices, args, flush, log,
                                           keep_shards=not last)
                run["records"] += recs
                if on_record:
                    on_record(run)
        except Exception as e:  # noqa: BLE001 -- keep what was measured, go on
            run["notes"].append(f"{cfg.name}: stopped early: {type(e).__name__}: {e}"[:400])
            log(run["notes"][-1])
        shards = None
        gc.collect()
        for d in devices:
            with torch.cuda.device(d):
                torch.cuda.empty_cache()
        if "cuda_graph" in args.variants and not args.child:
            for batch in batches:
                run["records"].append(graph_child(cfg, tp, batch, args, log))
                if on_record:
                    on_record(run)
    return run


def graph_child(cfg, tp, batch, args, log) -> dict:
    """The cuda_graph variant of one (model, batch) in a child process with a deadline."""
    from megakernel.bench.baselines import run_child
    log(f"{cfg.name} tp={tp} batch {batch} cuda_graph: child process, deadline "
        f"{args.graph_timeout:.0f} s")
    res, note = run_child(["-m", "megakernel", "bench", "--tp", str(tp), "--model", cfg.name,
                           "--batch", str(batch), "--pos", str(args.pos), "--iters",
                           str(args.iters), "--warmup", str(args.warmup), "--variants",
                           "cuda_graph", "--child"], args.graph_timeout)
    rec = next((r for r in (res or []) if r["contender"] == "cuda_graph"), None)
    if rec is None:
        log(f"{cfg.name} tp={tp} batch {batch} cuda_graph: {note or 'no record'}")
        return _record(cfg, tp, batch, args.pos, "cuda_graph", note=note or "no record")
    rec["note"] = ("child process; " + rec.get("note", "")).strip("; ")
    log(f"{cfg.name} tp={tp} batch {batch} cuda_graph: {rec['ms_per_step']} ms/step")
    return rec


def _record(cfg, tp, batch, pos, contender, ms=None, note="", **extra) -> dict:
    from megakernel.bench.harness import summarize
    weights, kv = bytes_per_gpu(cfg, tp, batch, pos)
    timing = summarize(ms) if ms else {"ms_per_step": None}
    return {"model": cfg.name, "batch": batch, "tp": tp, "contender": contender, **timing,
            "bytes_read_per_step": weights + kv, "weight_bytes": weights, "kv_bytes": kv,
            "note": note, **extra}


def bench_shape(cfg, shards, batch, tp, devices, args, flush, log, keep_shards):
    """-> (records of every variant for one (model, batch), the shards or None)."""
    from megakernel import Decoder
    from megakernel.bench import harness
    from megakernel.bench.tp_baseline import NcclComm, TpTorchModel
    from megakernel.packing import pack_shard
    pos = args.pos
    tokens, k, v = harness.seeded_inputs(cfg, batch, pos, devices[0])
    pos_t = torch.tensor([pos], device=devices[0])
    out = []

    def timed(step, before=None):
        return harness.time_steps(step, args.iters, args.warmup,
                                  before=flush if before is None else lambda: (flush(), before()))

    def attempt(name, fn):
        try:
            ms, extra = fn()
            out.append(_record(cfg, tp, batch, pos, name, ms, **extra))
            log(f"{cfg.name} tp={tp} batch {batch} {name}: {out[-1]['ms_per_step']:.3f} ms/step"
                + (f" ({extra['note']})" if extra.get("note") else ""))
        except Exception as e:  # noqa: BLE001 -- one variant failing must not end the run
            msg = f"failed: {type(e).__name__}: {(str(e).splitlines() or [''])[0]}"[:400]
            out.append(_record(cfg, tp, batch, pos, name, note=msg))
            log(f"{cfg.name} tp={tp} batch {batch} {name}: {msg}")

    # Baselines and the fp32 reference, on the unpacked shards.
    comm = NcclComm(devices)
    want = bf16_logits = None
    base = TpTorchModel(cfg, shards, comm, batch=batch, max_seq=pos + 1)
    base.seed_cache(k, v)
    if "eager" in args.variants:
        attempt("eager", lambda: (timed(lambda: base.forward(tokens, pos_t)), {}))
    if "cuda_graph" in args.variants and args.child:
        def graph():
            failed = []
            for mode in CAPTURE_MODES:   # the first capture_error_mode that captures
                try:
                    g = base.capture(tokens, pos_t, error_mode=mode)
                except RuntimeError as e:
                    failed.append(f"{mode}: {str(e)[:160]}")
                    continue
                note = f"captured with capture_error_mode={mode}" + (
                    f" (failed: {'; '.join(failed)})" if failed else "")
                return timed(g.replay), {"note": note}
            raise RuntimeError("capture failed in every mode: " + " | ".join(failed))
        attempt("cuda_graph", graph)
    wants_mk = any(v.startswith("megakernel") for v in args.variants)
    bf16_logits = base.forward(tokens, pos_t) if wants_mk else None
    base = None
    if not wants_mk:
        return out, shards
    try:
        ref = TpTorchModel(cfg, shards, comm, batch=batch, max_seq=pos + 1,
                           compute_dtype=torch.float32)
        ref.seed_cache(k, v)
        want = ref.forward(tokens, pos_t)
        ref = None
    except torch.cuda.OutOfMemoryError as e:
        log(f"fp32 reference: out of memory ({e})")
    gc.collect()

    # The megakernel variants share one packed copy.
    if keep_shards:
        packed = [pack_shard(s, tp, r, dtype=torch.bfloat16, device=devices[r])
                  for r, s in enumerate(shards)]
    else:
        packed = [pack_shard(s, tp, r, dtype=torch.bfloat16, device=devices[r], release=True)
                  for r, s in enumerate(shards)]
        shards = None
        gc.collect()
    for name, (comm_kind, options) in MK_VARIANTS.items():
        if name not in args.variants:
            continue

        def mk(comm_kind=comm_kind, options=options):
            t0 = time.perf_counter()
            dec = Decoder(cfg, packed, batch=batch, max_seq=pos + 1, tp=tp, comm=comm_kind,
                          **options)
            dec.seed_kv(k, v)
            dec.set_position(pos)
            dec.launch_step(tokens)
            dec.runtime.check()
            got = dec.buffers.logits.clone()
            setup_s = time.perf_counter() - t0
            note = ""
            step, failed = None, []
            for mode in CAPTURE_MODES:
                try:
                    step = dec.runtime.capture(error_mode=mode).replay
                    note = f"captured with capture_error_mode={mode}"
                    break
                except Exception as e:  # noqa: BLE001 -- try the next mode, else eager
                    failed.append(f"{mode}: {type(e).__name__}: {str(e)[:120]}")
                    for d in dec.devices:
                        torch.cuda.synchronize(d)
            if step is None:
                if comm_kind == "peer":
                    raise RuntimeError("capture failed: " + " | ".join(failed))
                dec.set_position(pos)
                step, note = dec.launch_step, ("launched eagerly: CUDA-graph capture failed ("
                                               + " | ".join(failed) + ")")
            ms = timed(step, lambda: dec.set_position(pos))
            dec.runtime.check()
            check = errors(got, bf16_logits, want)
            return ms, dict(policy=dec.program.policy, setup_s=setup_s, check=check,
                            fold=dec.program.ranks[0].options["fold"],
                            launches_per_step=dec.runtime.num_phases, note=note,
                            predicted_ms=dec.program.predicted_us / 1e3)
        attempt(name, mk)
        gc.collect()
    return out, shards


def errors(got, bf16, want) -> dict:
    if want is None:
        return {"ok": None, "note": "no fp32 reference (out of memory)"}
    scale = want.abs().max()
    err_mk = ((got.to(want.device) - want).abs().max() / scale).item()
    err_bf = ((bf16 - want).abs().max() / scale).item()
    return {"megakernel": err_mk, "bf16_eager": err_bf, "ok": err_mk <= 2 * err_bf + 2e-3}


def method(args, tp) -> list[str]:
    return [
        f"tp={tp}: one Python process drives every GPU. Every variant runs on the same "
        "weights (bench.tp_baseline.random_shards, seed 0: the shards of Weights.random) and "
        f"the same random KV history of positions 0..{args.pos - 1}; each step reads positions "
        f"0..{args.pos} and writes {args.pos}.",
        f"Timing: {args.warmup} warm-up steps, then CUDA events on GPU 0 around each of "
        f"{args.iters} steps (every variant joins all GPUs' work into GPU 0's stream); the L2 "
        "of every GPU is flushed between steps, untimed. Median reported.",
        "bytes_read_per_step is per GPU: weights / tp + the GPU's own kv heads; "
        "fraction_of_copy_bandwidth is of GPU 0's device-to-device copy bandwidth measured "
        "in this run (read + write counted).",
        "eager / cuda_graph: the Megatron-TP PyTorch step with torch.cuda.nccl all-reduces "
        "(NVLink multicast off), eager and replayed from one CUDA graph per GPU. megakernel: "
        "in-kernel peer stores + system-scope counters, graph-replayed. megakernel_nccl: "
        "the same Programs as 2L + 2 launches with NCCL all-gathers between them. "
        "megakernel_fold: megakernel planned with fold=True (the residual's readers sum the "
        "tp partials instead of RESID_SUM stages; kernel built with -DMK_FOLD=1). "
        "megakernel_reduce1: megakernel planned with reduce_slices=1 (one ATTN_REDUCE "
        "per kv group instead of one per q head). megakernel_fused: planned with "
        "fuse_reduce=True (the last ATTN split of each group merges it, no ATTN_REDUCE).",
        "Correctness: one step of each megakernel variant vs the fp32 TP reference (the same "
        "bf16 shards upcast per layer), beside bf16 eager's error.",
    ]
