"""End to end on the GPU: the megakernel against the eager reference (fp32 oracle, bf16
baseline), greedy decoding, the watchdog, CUDA-graph replay."""
from __future__ import annotations

import time

import numpy as np
import pytest
import torch

from megakernel import Decoder, ModelConfig, ReferenceModel, Weights, plan
from megakernel.scheduler import isa
from megakernel.scheduler.isa import Op

pytestmark = pytest.mark.gpu

RANDOM_CONFIGS = [
    ModelConfig("d64x3", vocab_size=3000, hidden_size=192, intermediate_size=512, num_layers=3,
                num_heads=3, num_kv_heads=3, head_dim=64),                       # GQA 1
    ModelConfig("d128g4", vocab_size=5000, hidden_size=1024, intermediate_size=2816,
                num_layers=2, num_heads=8, num_kv_heads=2, head_dim=128),        # GQA 4
    ModelConfig("d64g8", vocab_size=4096, hidden_size=576, intermediate_size=1536,
                num_layers=2, num_heads=8, num_kv_heads=1, head_dim=64,
                tie_word_embeddings=True),                                       # GQA 8
]


def seed_context(models, cfg, batch, P, seed):
    """Give every model the same random KV history of P positions (bf16 values)."""
    g = torch.Generator(device="cuda").manual_seed(seed)
    shape = (cfg.L, batch, cfg.Hkv, P, cfg.D)
    k = torch.randn(shape, generator=g, device="cuda").bfloat16()
    v = torch.randn(shape, generator=g, device="cuda").bfloat16()
    for m in models:
        if isinstance(m, Decoder):
            m.buffers.k_cache[:, :, :, :P] = k
            m.buffers.v_cache[:, :, :, :P] = v
            m.buffers.pos.fill_(P)
        else:
            m.cache.k[:, :, :, :P] = k.to(m.cache.k.dtype)
            m.cache.v[:, :, :, :P] = v.to(m.cache.v.dtype)
        m.pos = P


def relative_errors(cfg, batch, positions, steps=3, seed=0, **decoder_kw):
    """Max relative logit error vs the fp32 oracle of (megakernel, bf16 eager)."""
    w = Weights.random(cfg, seed=seed, dtype=torch.bfloat16, device="cuda")
    max_seq = max(positions) + steps + 1
    mk = Decoder(cfg, w, batch=batch, max_seq=max_seq, **decoder_kw)
    bf = ReferenceModel(cfg, w, batch=batch, max_seq=max_seq)
    fp = ReferenceModel(cfg, w, batch=batch, max_seq=max_seq, dtype=torch.float32)
    g = torch.Generator(device="cuda").manual_seed(seed + 1)
    worst_mk = worst_bf = 0.0
    for P in positions:
        for m in (mk, bf, fp):
            m.reset()
        seed_context((mk, bf, fp), cfg, batch, P, seed + P)
        for _ in range(steps):
            tokens = torch.randint(0, cfg.V, (batch,), generator=g, device="cuda")
            ref = fp.step(tokens)
            scale = ref.abs().max().item()
            got = mk.step(tokens)
            assert torch.isfinite(got).all()
            worst_mk = max(worst_mk, (got - ref).abs().max().item() / scale)
            worst_bf = max(worst_bf, (bf.step(tokens) - ref).abs().max().item() / scale)
    return worst_mk, worst_bf


def assert_within_bf16(err_mk, err_bf, what):
    print(f"{what}: megakernel {err_mk:.3e}, bf16 eager {err_bf:.3e}")
    assert err_mk <= 2 * err_bf + 2e-3, f"{what}: {err_mk:.3e} > 2 x {err_bf:.3e} + 2e-3"


@pytest.mark.parametrize("batch", [1, 4, 16])
@pytest.mark.parametrize("cfg", RANDOM_CONFIGS, ids=lambda c: c.name)
def test_random_configs_match_fp32(cfg, batch):
    err_mk, err_bf = relative_errors(cfg, batch, positions=[0, 37, 1000])
    assert_within_bf16(err_mk, err_bf, f"{cfg.name} B={batch}")


@pytest.mark.parametrize("policy", ["rr", "lpt", "dag"])
def test_tiny_every_policy(policy):
    err_mk, err_bf = relative_errors(ModelConfig.preset("tiny"), 2, positions=[0, 200],
                                     policy=policy)
    assert_within_bf16(err_mk, err_bf, f"tiny {policy}")


@pytest.mark.parametrize("name,batch", [("llama-3.2-1b", 1), ("llama-3.2-1b", 8),
                                        ("llama-3.2-1b", 16), ("llama-3.1-8b", 1)])
def test_llama_shapes_match_fp32(name, batch):
    cfg = ModelConfig.preset(name)
    err_mk, err_bf = relative_errors(cfg, batch, positions=[5, 4090], steps=2)
    assert_within_bf16(err_mk, err_bf, f"{name} B={batch}")


@pytest.mark.parametrize("batch", [1, 4, 16])
@pytest.mark.parametrize("cfg", RANDOM_CONFIGS + [ModelConfig.preset("llama-3.2-1b")],
                         ids=lambda c: c.name)
def test_fused_reduce_matches_fp32(cfg, batch):
    """plan(fuse_reduce=True): the last ATTN split of each group merges it (ticket)."""
    err_mk, err_bf = relative_errors(cfg, batch, positions=[0, 37, 1000], fuse_reduce=True)
    assert_within_bf16(err_mk, err_bf, f"{cfg.name} B={batch} fuse_reduce")


@pytest.mark.parametrize("col_slices", [0, 1])
@pytest.mark.parametrize("batch", [1, 2, 4, 8])
@pytest.mark.parametrize("cfg", RANDOM_CONFIGS + [ModelConfig.preset("llama-3.2-1b")],
                         ids=lambda c: c.name)
def test_fused_oproj_matches_fp32(cfg, batch, col_slices):
    """plan(fuse_oproj=True, down_k_slices=1): ATTN_OPROJ merges a head's dims and adds
    their O projection to the residual with atomics, onto the copy the previous DOWN stored;
    in column slices whose rows groups of threads share (col_slices 0) or in whole rows (1);
    batch 8 is its BT=8 bucket."""
    err_mk, err_bf = relative_errors(cfg, batch, positions=[0, 37, 1000], fuse_oproj=True,
                                     oproj_col_slices=col_slices, down_k_slices=1)
    assert_within_bf16(err_mk, err_bf, f"{cfg.name} B={batch} fuse_oproj cols {col_slices}")


@pytest.mark.parametrize("build", [(), ("-DMK_FUSE_OPROJ=0",)], ids=["default", "no_op"])
@pytest.mark.parametrize("batch", [1, 4])
@pytest.mark.parametrize("cfg", RANDOM_CONFIGS + [ModelConfig.preset("llama-3.2-1b")],
                         ids=lambda c: c.name)
def test_unfused_oproj_matches_fp32(cfg, batch, build):
    """plan(fuse_oproj=False) where the default fuses: ATTN_REDUCE and OPROJ stages, in the
    default build and in the one without ATTN_OPROJ."""
    err_mk, err_bf = relative_errors(cfg, batch, positions=[0, 37, 1000], fuse_oproj=False,
                                     build_flags=build)
    assert_within_bf16(err_mk, err_bf, f"{cfg.name} B={batch} fuse_oproj=False {build}")


# ATTN counts its signal without a release only in a kernel that cannot run ATTN_OPROJ
# (relaxed_signal): the polled partials hop is the unfused plan's, in that build.
LL_BUILDS = {"ll_partials": ("-DMK_LL_PARTIALS=1", "-DMK_FUSE_OPROJ=0"),
             "ll_partials_fused": ("-DMK_LL_PARTIALS=1",), "ll_q": ("-DMK_LL_Q=1",),
             "ll_both": ("-DMK_LL_Q=1", "-DMK_LL_PARTIALS=1", "-DMK_FUSE_OPROJ=0"),
             "no_ll_q": ("-DMK_LL_Q=0",)}


WIDE = ModelConfig("d2560", vocab_size=3000, hidden_size=2560, intermediate_size=1024,
                   num_layers=2, num_heads=4, num_kv_heads=2, head_dim=64)


@pytest.mark.parametrize("batch", [1, 2])
@pytest.mark.parametrize("cfg", RANDOM_CONFIGS + [WIDE, ModelConfig.preset("llama-3.2-1b")],
                         ids=lambda c: c.name)
def test_ll_x_build_matches_fp32(cfg, batch):
    """-DMK_LL_X=1 (the batch-1/2 build): every DOWN also stores the residual as flagged
    elements and QKV of layers >= 1 and LMHEAD poll them instead of waiting on the DOWN
    counter (d2560 at batch 2: chunks of 2048 + 512 columns). Three steps per position (tags
    of epochs 1-3), reset between positions (tags zeroed)."""
    err_mk, err_bf = relative_errors(cfg, batch, positions=[0, 37, 1000],
                                     build_flags=("-DMK_LL_X=1",))
    assert_within_bf16(err_mk, err_bf, f"{cfg.name} B={batch} MK_LL_X=1")


def test_ll_x_build_refuses_k_sliced_down():
    """A -DMK_LL_X=1 kernel's QKV polls what a DOWN of whole rows writes: a plan of K-sliced
    DOWNs is refused with the option to change, not left to the watchdog."""
    cfg = RANDOM_CONFIGS[0]
    w = Weights.random(cfg, seed=0, dtype=torch.bfloat16, device="cuda")
    with pytest.raises(ValueError, match="down_k_slices=1"):
        Decoder(cfg, w, batch=1, max_seq=64, down_k_slices=2, fuse_oproj=False, variant="b1",
                build_flags=("-DMK_LL_X=1",))


NINE_WARP_BUILDS = {"nine_warps": ("-DMK_WARPGROUPS=0",),
                    "nine_warps_ll_partials": ("-DMK_WARPGROUPS=0", "-DMK_LL_PARTIALS=1")}


@pytest.mark.parametrize("build", list(NINE_WARP_BUILDS))
@pytest.mark.parametrize("batch", [1, 2, 8])
@pytest.mark.parametrize("cfg", RANDOM_CONFIGS + [ModelConfig.preset("llama-3.2-1b")],
                         ids=lambda c: c.name)
def test_nine_warp_builds_match_fp32(cfg, batch, build):
    """-DMK_WARPGROUPS=0: session 34's block, 9 warps at 168 registers (the default is 12
    warps whose loader warpgroup hands its registers to the consumers through setmaxnreg),
    where the batch-1/2 build leaves MK_LL_PARTIALS off; and with it on, spilling. Both
    builds (batch 8: the other). Three steps per position, reset between positions."""
    err_mk, err_bf = relative_errors(cfg, batch, positions=[0, 37, 1000],
                                     **build_kwargs(NINE_WARP_BUILDS[build]))
    assert_within_bf16(err_mk, err_bf, f"{cfg.name} B={batch} {build}")


@pytest.mark.parametrize("batch", [1, 2, 8])
@pytest.mark.parametrize("cfg", RANDOM_CONFIGS[:2] + [ModelConfig.preset("llama-3.2-1b")],
                         ids=lambda c: c.name)
def test_quiet_wait_build_matches_fp32(cfg, batch):
    """-DMK_QUIET_WAIT_NS=1000: the loader stays quiet past each release until the next wait
    has passed or 1 us (timing only; a loader that never resumed would hang the step into
    the watchdog). Both builds, three steps per position."""
    err_mk, err_bf = relative_errors(cfg, batch, positions=[0, 37, 1000],
                                     build_flags=("-DMK_QUIET_WAIT_NS=1000",))
    assert_within_bf16(err_mk, err_bf, f"{cfg.name} B={batch} MK_QUIET_WAIT_NS=1000")


def build_kwargs(flags: tuple[str, ...]) -> dict:
    """Decoder keywords of a build: a kernel without ATTN_OPROJ runs the unfused plan."""
    return dict(build_flags=flags, **({"fuse_oproj": False} if "-DMK_FUSE_OPROJ=0" in flags
                                      else {}))


@pytest.mark.parametrize("build", list(LL_BUILDS))
@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("cfg", RANDOM_CONFIGS + [ModelConfig.preset("llama-3.2-1b")],
                         ids=lambda c: c.name)
def test_flagged_builds_match_fp32(cfg, batch, build):
    """-DMK_LL_PARTIALS=1: ATTN_REDUCE polls its partials' tags, not the ATTN counters
    (ll_partials_fused: the fused default plan, whose ATTN_OPROJ polls them after waiting on
    its residual's writer alone); -DMK_LL_Q=1: ATTN polls q's and the new K/V's,
    not the QKV counters (the batch-1/2 build's default; ll_q: in the other build too);
    no_ll_q: the counters in both. Three steps per position (tags of epochs 1-3), reset
    between positions (tags zeroed)."""
    err_mk, err_bf = relative_errors(cfg, batch, positions=[0, 37, 1000],
                                     **build_kwargs(LL_BUILDS[build]))
    assert_within_bf16(err_mk, err_bf, f"{cfg.name} B={batch} {build}")


@pytest.mark.parametrize("n", [3, 4])
@pytest.mark.parametrize("batch", [1, 3, 8, 16])
@pytest.mark.parametrize("cfg", RANDOM_CONFIGS + [ModelConfig.preset("llama-3.2-1b")],
                         ids=lambda c: c.name)
def test_down_k_slices_match_fp32(cfg, batch, n):
    """plan(down_k_slices=n, fuse_oproj=False): every DOWN row slice in n K slices (3: unequal
    ones) whose sums are added into the residual with fp32 atomics, onto the copy each OPROJ
    stores (batch 1: the CUDA-core matvec; 3 and up: tensor cores)."""
    err_mk, err_bf = relative_errors(cfg, batch, positions=[0, 37, 1000], down_k_slices=n,
                                     fuse_oproj=False)
    assert_within_bf16(err_mk, err_bf, f"{cfg.name} B={batch} down_k_slices={n}")


@pytest.mark.parametrize("n", [2, 3])
@pytest.mark.parametrize("batch", [1, 3, 5, 8])
@pytest.mark.parametrize("cfg", RANDOM_CONFIGS + [ModelConfig.preset("llama-3.2-1b")],
                         ids=lambda c: c.name)
def test_fused_oproj_with_down_k_slices_matches_fp32(cfg, batch, n):
    """plan(fuse_oproj=True, down_k_slices=n): GATEUP stores the copies of resid[2l+1] that
    the DOWN K slices add onto (two levels: the next ATTN_OPROJ adds onto the second), and
    ATTN_OPROJ runs up to batch 8 (its batch-8 bucket: row-group sums in two halves)."""
    err_mk, err_bf = relative_errors(cfg, batch, positions=[0, 37, 1000], down_k_slices=n,
                                     fuse_oproj=True)
    assert_within_bf16(err_mk, err_bf, f"{cfg.name} B={batch} fused down_k_slices={n}")


@pytest.mark.parametrize("batch", [3, 8, 16])
@pytest.mark.parametrize("cfg", RANDOM_CONFIGS + [ModelConfig.preset("llama-3.2-1b")],
                         ids=lambda c: c.name)
def test_shared_tc_acc_build_matches_fp32(cfg, batch):
    """-DMK_TC_WARP_ACC=0: tensor-core pages flush into the shared accumulators with atomics
    everywhere, not into per-warp copies where 8 fit (the default)."""
    err_mk, err_bf = relative_errors(cfg, batch, positions=[0, 37, 1000],
                                     build_flags=("-DMK_TC_WARP_ACC=0",))
    assert_within_bf16(err_mk, err_bf, f"{cfg.name} B={batch} MK_TC_WARP_ACC=0")


@pytest.mark.parametrize("batch", [1, 8])
@pytest.mark.parametrize("cfg", RANDOM_CONFIGS + [ModelConfig.preset("llama-3.2-1b")],
                         ids=lambda c: c.name)
def test_wait_first_matches_fp32(cfg, batch):
    """-DMK_SETUP_FIRST=0, the order before session 16: a matvec (CUDA cores at batch 1,
    tensor cores at 8) waits on its counters first and sets up after."""
    err_mk, err_bf = relative_errors(cfg, batch, positions=[0, 37, 1000],
                                     build_flags=("-DMK_SETUP_FIRST=0",))
    assert_within_bf16(err_mk, err_bf, f"{cfg.name} B={batch} wait_first")


@pytest.mark.parametrize("flags", [("-DMK_CHAIN_INFLIGHT=0",), ("-DMK_CHAIN_QKV=0",),
                                   ("-DMK_CHAIN_DOWN=0",)],
                         ids=["chain_inflight_off", "chain_from_attn", "chain_not_down"])
@pytest.mark.parametrize("batch", [1, 8])
@pytest.mark.parametrize("cfg", RANDOM_CONFIGS + [ModelConfig.preset("llama-3.2-1b")],
                         ids=lambda c: c.name)
def test_chain_inflight_matches_fp32(cfg, batch, flags):
    """The loader's one-page cap on the attention chain (MK_CHAIN_INFLIGHT, MK_CHAIN_QKV,
    MK_CHAIN_DOWN; all on by default, so the other decoder tests run it) off and in its
    narrower forms, in both builds: the ring's slot reuse under the changing cap must keep
    every page's parity right."""
    err_mk, err_bf = relative_errors(cfg, batch, positions=[0, 37, 1000], build_flags=flags)
    assert_within_bf16(err_mk, err_bf, f"{cfg.name} B={batch} {flags}")


def broken_tiny(batch, waiter=None):
    """tiny's config, weights and a plan whose counter c (waited on by the last waiting
    instruction, or the first `waiter` op that waits) needs one more signal than any step
    delivers: -> (cfg, w, plan, c)."""
    cfg = ModelConfig.preset("tiny")
    w = Weights.random(cfg, seed=3, dtype=torch.bfloat16, device="cuda")
    broken = plan(cfg, batch=batch, num_sms=8, policy="dag")
    ins = broken.instructions.reshape(-1, broken.instructions.shape[-1])
    waiting = ins[ins[:, 4] > 0]                                   # wait0_count > 0
    c = int(waiting[-1, 3] if waiter is None else waiting[waiting[:, 0] == int(waiter)][0, 3])
    broken.counter_targets = broken.counter_targets.copy()
    broken.counter_targets[c] += 1
    return cfg, w, broken, c


@pytest.mark.parametrize("batch", [1, 8])
def test_watchdog_reports_a_matvec_wait(batch):
    """A matvec whose counter never completes: its wait, which runs after its setup (CUDA
    cores at batch 1, tensor cores at 8), times out, names the counter, and the kernel
    stops."""
    cfg, w, broken, c = broken_tiny(batch, waiter=Op.DOWN)
    dec = Decoder(cfg, w, batch=batch, max_seq=16, program=broken, watchdog_ms=300)
    with pytest.raises(RuntimeError, match=f"counter {c}"):
        dec.step(torch.arange(1, batch + 1, device="cuda"))


def test_kernel_refuses_a_malformed_down_k_slice():
    """A K-sliced DOWN whose kn is not whole 64-column units: the validator refuses such a
    plan, Decoder runs the Program it is given, and the kernel's own check stops the block
    before the matvec (BAD_INSTRUCTION, naming DOWN). The first K slice grows, so the
    loader's copies stay inside wdown."""
    cfg = ModelConfig.preset("tiny")
    w = Weights.random(cfg, seed=3, dtype=torch.bfloat16, device="cuda")
    bad = plan(cfg, batch=8, num_sms=8, down_k_slices=2)
    kn = isa.word_index(Op.DOWN, "kn")
    sm, k = np.argwhere((bad.instructions[..., 0] == Op.DOWN)
                        & (bad.instructions[..., isa.word_index(Op.DOWN, "k0")] == 0))[0]
    bad.instructions[sm, k, kn] += 8
    tokens = torch.arange(1, 9, device="cuda")
    dec = Decoder(cfg, w, batch=8, max_seq=16, program=bad, watchdog_ms=300)
    with pytest.raises(RuntimeError, match=r"malformed instruction .*DOWN K slice.*, DOWN\)"):
        dec.step(tokens)


def test_kernel_refuses_a_malformed_gateup_copy():
    """A GATEUP copy 2 on the last layer (there is no resid[2L+1]): the validator refuses
    such a plan, and the kernel's own check stops the block (BAD_INSTRUCTION, naming
    GATEUP) instead of storing past the residual."""
    cfg = ModelConfig.preset("tiny")
    w = Weights.random(cfg, seed=3, dtype=torch.bfloat16, device="cuda")
    bad = plan(cfg, batch=5, num_sms=8, fuse_oproj=True, down_k_slices=2)
    ins = bad.instructions
    sm, k = np.argwhere((ins[..., 0] == Op.GATEUP) & (ins[..., 1] == cfg.L - 1))[0]
    ins[sm, k, isa.word_index(Op.GATEUP, "copy")] = 2
    tokens = torch.arange(1, 6, device="cuda")
    dec = Decoder(cfg, w, batch=5, max_seq=16, program=bad, watchdog_ms=300)
    with pytest.raises(RuntimeError, match=r"malformed instruction .*residual copy.*, GATEUP\)"):
        dec.step(tokens)


def test_fused_plan_needs_the_fused_build():
    """A merging ATTN record is refused by a default build's Runtime, not run unmerged; an
    ATTN_OPROJ record by a build without ATTN_OPROJ."""
    from megakernel.packing import pack_weights
    from megakernel.runtime import Runtime
    cfg = ModelConfig.preset("tiny")
    packed = pack_weights(Weights.random(cfg, seed=0, dtype=torch.bfloat16, device="cuda"))
    with pytest.raises(ValueError, match="MK_FUSE_REDUCE"):
        Runtime(packed, plan(cfg, num_sms=8, fuse_reduce=True), 16)
    with pytest.raises(ValueError, match="MK_FUSE_OPROJ=0"):
        Runtime(packed, plan(cfg, num_sms=8), 16, build_flags=("-DMK_FUSE_OPROJ=0",))


def greedy_agreement(cfg, policy, steps, batch=1, seed=0):
    """Free-running greedy tokens of the megakernel and of bf16 eager from the same prompt.
    Returns (first divergence step or None, reference top-2 margin there, logit error)."""
    w = Weights.random(cfg, seed=seed, dtype=torch.bfloat16, device="cuda")
    mk = Decoder(cfg, w, batch=batch, max_seq=steps + 8, policy=policy)
    bf = ReferenceModel(cfg, w, batch=batch, max_seq=steps + 8)
    prompt = torch.randint(0, cfg.V, (batch, 4), generator=torch.Generator().manual_seed(seed),
                           dtype=torch.int64).cuda()
    a = mk.generate(prompt, steps)
    b = bf.generate(prompt, steps)
    if torch.equal(a, b):
        return None, None, None
    t = int((a != b).any(0).nonzero()[0])
    # replay the agreed prefix on both to measure the margin where they part
    bf.reset(); mk.reset()
    for i in range(t - 1):
        bf.step(b[:, i]); mk.step(b[:, i])
    lb, lm = bf.step(b[:, t - 1]), mk.step(b[:, t - 1])
    top2 = lb.topk(2, dim=-1).values
    return t, (top2[:, 0] - top2[:, 1]).min().item(), (lb - lm).abs().max().item()


@pytest.mark.parametrize("policy", ["rr", "lpt", "dag"])
@pytest.mark.parametrize("name", ["tiny", "llama-3.2-1b"])
def test_greedy_tokens_equal_bf16_reference(name, policy):
    t, margin, err = greedy_agreement(ModelConfig.preset(name), policy, steps=64)
    if t is not None:
        # Legitimate only where the reference itself is undecided: its top-2 margin is within
        # the logit difference between two valid bf16 evaluations.
        pytest.fail(f"{name}/{policy}: tokens differ from step {t}; reference top-2 margin "
                    f"{margin:.4f}, logit difference {err:.4f}")


def test_watchdog_reports_a_counter_that_never_completes():
    cfg, w, broken, c = broken_tiny(1)
    dec = Decoder(cfg, w, batch=1, max_seq=16, program=broken, watchdog_ms=300)
    t0 = time.perf_counter()
    with pytest.raises(RuntimeError, match=f"counter {c}"):
        dec.step(torch.tensor([1], device="cuda"))
    assert time.perf_counter() - t0 < 10
    good = Decoder(cfg, w, batch=1, max_seq=16, num_sms=8)
    ref = ReferenceModel(cfg, w, batch=1, max_seq=16, dtype=torch.float32)
    tok = torch.tensor([7], device="cuda")
    torch.testing.assert_close(good.step(tok), ref.step(tok), rtol=0.05, atol=0.05)


@pytest.mark.parametrize("flags", [(), LL_BUILDS["ll_both"]], ids=["default", "ll_both"])
def test_cuda_graph_replay_matches_steps(flags):
    """Graph replays give the tokens eager steps of the default build give; in the build
    with both flagged hops the tags follow the epoch in device memory."""
    cfg = ModelConfig.preset("tiny")
    w = Weights.random(cfg, seed=4, dtype=torch.bfloat16, device="cuda")
    prompt = torch.tensor([[5, 9, 2]], device="cuda")
    kw = build_kwargs(flags)
    eager = Decoder(cfg, w, batch=1, max_seq=64, fuse_oproj=kw.get("fuse_oproj"))
    expect = eager.generate(prompt, 20)
    graphed = Decoder(cfg, w, batch=1, max_seq=64, **kw)
    graphed.generate(prompt, 1)             # prompt through eager steps, first new token
    graph = graphed.capture()
    got = [graphed.buffers.out_tokens.clone()]
    for _ in range(19):
        graph.replay()
        got.append(graphed.buffers.out_tokens.clone())
    graphed.runtime.check()
    assert torch.equal(torch.stack(got, 1), expect[:, 3:])


def test_counters_are_monotonic_across_steps():
    cfg = ModelConfig.preset("tiny")
    w = Weights.random(cfg, seed=5, dtype=torch.bfloat16, device="cuda")
    dec = Decoder(cfg, w, batch=2, max_seq=16, num_sms=16)
    for s in range(1, 4):
        dec.step(torch.tensor([1, 2], device="cuda"))
        targets = torch.as_tensor(dec.program.counter_targets).cuda()
        assert torch.equal(dec.buffers.counters, targets * s)
        assert int(dec.buffers.epoch) == s


def test_timing_records_every_instruction():
    cfg = ModelConfig.preset("tiny")
    w = Weights.random(cfg, seed=6, dtype=torch.bfloat16, device="cuda")
    dec = Decoder(cfg, w, batch=1, max_seq=16, num_sms=16, timing=True)
    dec.runtime.timing.fill_(-1)            # poison: every stamp must be written
    dec.step(torch.tensor([3], device="cuda"))
    t = dec.runtime.timing.cpu().numpy()
    for sm, n in enumerate(dec.program.queue_len):
        # wait start, wait end, outputs written, end of each instruction, in time order
        stamps = t[sm, :n][:, [0, 1, 3, 2]].reshape(-1)
        assert (stamps > 0).all(), f"SM {sm}: unwritten stamps"
        assert (np.diff(stamps) >= 0).all(), f"SM {sm}: stamps out of order"
        assert (t[sm, n:] == -1).all(), f"SM {sm}: stamps past the queue"


def test_timing_stamps_every_ring_page():
    cfg = ModelConfig.preset("tiny")
    w = Weights.random(cfg, seed=6, dtype=torch.bfloat16, device="cuda")
    dec = Decoder(cfg, w, batch=1, max_seq=16, num_sms=16, timing=True)
    dec.runtime.timing.fill_(-1)
    dec.runtime.page_timing.fill_(-1)       # poison: stamped pages must be overwritten
    dec.step(torch.tensor([3], device="cuda"))
    t, p = dec.runtime.timing.cpu().numpy(), dec.runtime.page_timing.cpu().numpy()
    matvec = np.isin(dec.program.instructions[..., 0],   # the ops that stream ring pages
                     [int(o) for o in (Op.QKV, Op.OPROJ, Op.ATTN_OPROJ, Op.GATEUP, Op.DOWN,
                                       Op.LMHEAD)])
    for sm, n in enumerate(dec.program.queue_len):
        k = int((p[sm, :, 0] != -1).sum())
        assert (p[sm, :k] > 0).all() and (p[sm, k:] == -1).all(), f"SM {sm}: not a prefix"
        assert (k > 0) == bool(matvec[sm, :n].any()), f"SM {sm}: {k} pages stamped"
        issue, start, got, done, free, cap, issued, reached = p[sm, :k].T
        assert (got >= start).all() and (got >= issue).all() and (done >= got).all()
        # the loader's own progress: reached <= slot free <= cap passed <= issue <= issued,
        # and each page reached after the page before was issued
        assert (np.diff(np.stack([reached, free, cap, issue, issued]), axis=0) >= 0).all()
        assert (reached[1:] >= issued[:-1]).all(), f"SM {sm}: loader stamps out of order"
        win = [(t[sm, i, 1], t[sm, i, 2]) for i in range(n) if matvec[sm, i]]
        assert all(any(a <= g <= b for a, b in win) for g in got), f"SM {sm}: page outside"


def test_phase_stamps_only_with_their_build_flag():
    cfg = ModelConfig.preset("tiny")
    w = Weights.random(cfg, seed=6, dtype=torch.bfloat16, device="cuda")
    ops = {int(o) for o in (Op.QKV, Op.ATTN, Op.ATTN_REDUCE, Op.OPROJ, Op.ATTN_OPROJ,
                            Op.GATEUP, Op.DOWN, Op.LMHEAD)}
    for flags in ((), ("-DMK_PHASE_STAMPS=1",)):
        dec = Decoder(cfg, w, batch=1, max_seq=16, num_sms=16, timing=True, build_flags=flags)
        dec.runtime.phase_timing.fill_(-1)  # poison
        dec.step(torch.tensor([3], device="cuda"))
        t, ph = dec.runtime.timing.cpu().numpy(), dec.runtime.phase_timing.cpu().numpy()
        for sm, n in enumerate(dec.program.queue_len):
            for i in range(n):
                got = ph[sm, i][ph[sm, i] != -1]
                if not flags or int(dec.program.instructions[sm, i, 0]) not in ops:
                    assert len(got) == 0, f"SM {sm} instruction {i}: stamped {got}"
                    continue
                assert len(got) >= 1, f"SM {sm} instruction {i}: no phase stamped"
                # inside the instruction: after its wait, before its outputs are written
                assert (got >= t[sm, i, 1]).all() and (got <= t[sm, i, 3]).all()


@pytest.mark.parametrize("variant", ["b1", "default", "b1_tc"])
@pytest.mark.parametrize("batch", [1, 2])
@pytest.mark.parametrize("cfg", RANDOM_CONFIGS[:2] + [ModelConfig.preset("llama-3.2-1b")],
                         ids=lambda c: c.name)
def test_batch_variants_match_fp32(cfg, batch, variant):
    """Both builds at batches 1-2: megakernel_b1.cu (6 ring slots, 4096 accumulators, groups
    of up to 4 q heads; what "auto" picks at batch 1) and megakernel.cu; b1_tc: the b1
    build with the tensor-core matvec compiled in (-DMK_B1_TC=1; its batches never reach it;
    MK_LL_Q then off: the b1 build's defaults up to session 32)."""
    flags = ("-DMK_B1_TC=1",) if variant == "b1_tc" else ()
    err_mk, err_bf = relative_errors(cfg, batch, positions=[0, 37, 1000],
                                     variant=variant.removesuffix("_tc"), build_flags=flags)
    assert_within_bf16(err_mk, err_bf, f"{cfg.name} B={batch} {variant}")


# The b1 build stages 4096-float activation chunks: at batch 1 DOWN's input of I = 5120 comes
# in two (the second short), of 14336 in four, of llama-3.2-1b's 8192 in two (batch 2: twice
# as many).
AHEAD_CONFIGS = [
    ModelConfig("i5120", vocab_size=3000, hidden_size=512, intermediate_size=5120,
                num_layers=2, num_heads=4, num_kv_heads=2, head_dim=128),
    ModelConfig("i14336", vocab_size=2048, hidden_size=256, intermediate_size=14336,
                num_layers=2, num_heads=4, num_kv_heads=1, head_dim=64),
]


@pytest.mark.parametrize("ahead", [1, 0])
@pytest.mark.parametrize("batch", [1, 2])
@pytest.mark.parametrize("cfg", AHEAD_CONFIGS + [ModelConfig.preset("llama-3.2-1b")],
                         ids=lambda c: c.name)
def test_b1_down_chunks_match_fp32(cfg, batch, ahead):
    """The b1 build's DOWN loads activation chunk c + 1 into registers before chunk c's pages
    and stores it after them (its default, MK_B1_STAGE_AHEAD=1; batch 2: chunks of 2048
    columns), or (0) stages each chunk after the previous chunk's pages."""
    flags = () if ahead else ("-DMK_B1_STAGE_AHEAD=0",)
    err_mk, err_bf = relative_errors(cfg, batch, positions=[0, 37, 1000], variant="b1",
                                     build_flags=flags)
    assert_within_bf16(err_mk, err_bf, f"{cfg.name} B={batch} stage_ahead={ahead}")


def test_variant_choice():
    """auto: the b1 build at batches 1-2 where the program fits it, the default one elsewhere;
    asking for b1 where it does not fit is an error naming why."""
    cfg = ModelConfig.preset("tiny")
    w = Weights.random(cfg, seed=0, dtype=torch.bfloat16, device="cuda")
    assert Decoder(cfg, w, batch=1, max_seq=64).runtime.variant == "b1"
    assert Decoder(cfg, w, batch=1, max_seq=64, variant="default").runtime.variant == "default"
    assert Decoder(cfg, w, batch=2, max_seq=64).runtime.variant == "b1"
    assert Decoder(cfg, w, batch=2, max_seq=64, variant="b1").runtime.variant == "b1"
    assert Decoder(cfg, w, batch=8, max_seq=64).runtime.variant == "default"
    with pytest.raises(ValueError, match="batches up to 2"):
        Decoder(cfg, w, batch=8, max_seq=64, variant="b1")
    g8 = RANDOM_CONFIGS[2]                                  # 8 q heads per kv head
    w8 = Weights.random(g8, seed=0, dtype=torch.bfloat16, device="cuda")
    assert Decoder(g8, w8, batch=1, max_seq=64).runtime.variant == "default"
    with pytest.raises(ValueError, match="groups of up to 4"):
        Decoder(g8, w8, batch=1, max_seq=64, variant="b1")
