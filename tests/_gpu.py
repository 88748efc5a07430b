"""Helpers of the GPU tests: one-instruction Programs run by the CUDA kernel and by the
PyTorch op reference (megakernel.ops_ref) on identical random inputs, outputs poisoned."""
from __future__ import annotations

import types

import numpy as np
import torch

from megakernel import ModelConfig, Weights, ops_ref, pack_weights
from megakernel.packing import add_wo_t
from megakernel.runtime import Runtime
from megakernel.scheduler import isa
from megakernel.scheduler.program import no_claims

# Awkward shapes: hidden sizes that are not multiples of 128, K chunked with a partial last
# chunk, GQA 1/3/8, head dims 32/64/128.
OP_CONFIGS = {
    "d192_g3_D64": ModelConfig("d192", vocab_size=1000, hidden_size=192, intermediate_size=200,
                               num_layers=2, num_heads=3, num_kv_heads=1, head_dim=64),
    "d1216_g1_D32": ModelConfig("d1216", vocab_size=777, hidden_size=1216,
                                intermediate_size=9000, num_layers=2, num_heads=4,
                                num_kv_heads=4, head_dim=32),
    "d256_g8_D128": ModelConfig("d256", vocab_size=4099, hidden_size=256, intermediate_size=344,
                                num_layers=2, num_heads=8, num_kv_heads=1, head_dim=128),
}


def one_instruction_program(cfg, batch, rec, attn_splits=3, lm_slices=2, counter_targets=()):
    return types.SimpleNamespace(
        config=cfg, batch=batch, num_sms=1, tp=1, rank=0, policy="test", attn_splits=attn_splits,
        lm_slices=lm_slices, instructions=np.asarray([[rec]], dtype=np.int32),
        queue_len=np.asarray([1], dtype=np.int32),
        counter_targets=np.asarray(counter_targets, np.int32), num_counters=len(counter_targets),
        claim=no_claims(), claim_len=0)   # static only, as Runtime expects of every Program


def random_inputs(buf, cfg, max_seq, seed, positions=None):
    """Fill every buffer with random, never-zero data (in place, on the buffers' device)."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    for name, t in buf.tensors().items():     # `part` exists only under tp > 1
        if name in ("counters", "epoch", "done", "error", "rope_cos", "rope_sin"):
            continue
        if t.is_floating_point():
            t.copy_(torch.randn(t.shape, generator=g).to(t.dtype))
    B = buf.tokens.shape[0]
    buf.tokens.copy_(torch.randint(0, cfg.V, (B,), generator=g))
    pos = positions if positions is not None else torch.randint(0, max_seq, (B,), generator=g)
    buf.pos.copy_(torch.as_tensor(pos, dtype=torch.int32))
    buf.amax_idx.copy_(torch.randint(0, cfg.V, buf.amax_idx.shape, generator=g))
    buf.lse.mul_(3.0)


def ll_q_expected(build_flags, variant: str) -> bool:
    """Whether ATTN polls the flagged q / k / v (MK_LL_Q) in this build at this variant: as
    -DMK_LL_Q says, else the variant's default (csrc/megakernel_b1.cu: on in "b1" where its
    tensor-core matvec is left out, i.e. unless -DMK_B1_TC=1 or MK_TC_MIN_BUCKET <= 2, and
    not with -DMK_FOLD=1)."""
    flags = dict(f[2:].split("=", 1) for f in build_flags if f.startswith("-D") and "=" in f)
    if "MK_LL_Q" in flags:
        return flags["MK_LL_Q"] != "0"
    tc = flags.get("MK_B1_TC", "1" if int(flags.get("MK_TC_MIN_BUCKET", 4)) <= 2 else "0")
    return variant == "b1" and tc == "0" and flags.get("MK_FOLD", "0") == "0"


def ll_x_expected(build_flags, cfg, batch: int) -> bool:
    """Whether a -DMK_LL_X build polls x_ll here: the batch-1/2 build only (csrc/common.cuh),
    which runs batches 1-2 of groups of at most 4 q heads (its MK_MAX_G)."""
    return "-DMK_LL_X=1" in build_flags and batch <= 2 and cfg.G <= 4


def run_op(cfg, batch, op, fields, layer=0, attn_splits=3, lm_slices=2, max_seq=96, seed=0,
           positions=None, poison=(), counter_targets=(), build_flags=(), watchdog_ms=None,
           gpu_only_poison=(), info=None, edit_weights=None):
    """Run one instruction on the GPU and through ops_ref on the CPU.
    poison: (buffer name, index) pairs set to NaN/INT_MIN on both sides first;
    gpu_only_poison: (float buffer, index) pairs set to NaN on the GPU side only.
    counter_targets: of the program's counters (all 0 at the launch; an ATTN ticket);
    build_flags: of the kernel (e.g. -DMK_FUSE_REDUCE=1 for an ATTN merge; with
    -DMK_LL_PARTIALS=1 an ATTN_REDUCE or ATTN_OPROJ (wo_t packed for it) finds its inputs
    flagged in part_ll (Runtime.ll_partials: the build that runs has it), with -DMK_LL_Q=1
    an ATTN in q_ll / kv_ll (Runtime.ll_q: the build that runs has it), before poison);
    edit_weights: called with the random Weights (on the GPU) before they are packed;
    info: a dict that gets "ll_q" (Runtime.ll_q), "ll_partials", "ll_x" (Runtime.ll_x: with
    it a QKV of layer >= 1 or an LMHEAD finds its input flagged in x_ll, and at batch 1-2
    its resid input NaN on the GPU) and "variant" (the build that ran).
    Returns (gpu Buffers moved to the CPU, reference Buffers)."""
    w = Weights.random(cfg, seed=seed, dtype=torch.bfloat16, device="cuda")
    if edit_weights is not None:
        edit_weights(w)
    packed = pack_weights(w)
    if op == isa.Op.ATTN_OPROJ:
        packed = add_wo_t(packed)
    rec = isa.encode(op, layer=layer, **fields)
    prog = one_instruction_program(cfg, batch, rec, attn_splits, lm_slices, counter_targets)
    rt = Runtime(packed, prog, max_seq, build_flags=build_flags, watchdog_ms=watchdog_ms)
    random_inputs(rt.buffers, cfg, max_seq, seed + 1, positions)
    if op in (isa.Op.ATTN_REDUCE, isa.Op.ATTN_OPROJ) and rt.ll_partials:
        rt.buffers.flag_partials(tag=1)   # it polls these (the epoch is 0)
    if info is not None:
        info.update(ll_q=rt.ll_q, ll_x=rt.ll_x, ll_partials=rt.ll_partials, variant=rt.variant)
    if op == isa.Op.ATTN and rt.ll_q:
        rt.buffers.flag_queries(tag=1)
    if rt.ll_x and (op == isa.Op.LMHEAD or (op == isa.Op.QKV and layer > 0)):
        # It polls these (on CUDA cores; tensor-core batches wait and read resid): its resid
        # input then holds NaN on the GPU, so only the flagged copy gives the right answer.
        rt.buffers.flag_resid(tag=1)
        if batch <= 2:
            level = 2 * cfg.L if op == isa.Op.LMHEAD else 2 * layer
            gpu_only_poison = [*gpu_only_poison, ("resid", level)]
    for name, index in poison:
        t = getattr(rt.buffers, name)
        t[index] = float("nan") if t.is_floating_point() else -(2 ** 31)
    ref = type(rt.buffers)(**{k: v.cpu().clone() for k, v in rt.buffers.tensors().items()})
    for name, index in gpu_only_poison:   # inputs the kernel must not read (the reference does)
        getattr(rt.buffers, name)[index] = float("nan")
    rt.launch()
    rt.check()
    got = type(rt.buffers)(**{k: v.cpu() for k, v in rt.buffers.tensors().items()})
    ops_ref.run(isa.decode(rec), packed.to(device="cpu", dtype=torch.float32), ref, prog)
    return got, ref


def assert_close(got, ref, name, rtol=1e-4, atol=1e-4):
    a, b = getattr(got, name), getattr(ref, name)
    assert not torch.isnan(b).all(), f"{name}: the reference wrote nothing"
    if a.is_floating_point():
        torch.testing.assert_close(a.float(), b.float(), rtol=rtol, atol=atol, equal_nan=True,
                                   msg=lambda m: f"{name}: {m}")
    else:
        assert torch.equal(a, b), f"{name}: {a} != {b}"
