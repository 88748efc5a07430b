"""Each opcode's PyTorch reference (megakernel.ops_ref) on a one-instruction Program, against
a straightforward full-matrix formulation on the unpacked weights. Awkward sizes, per-row
positions, outputs poisoned first: elements an op should write and does not stay NaN."""
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import megakernel as mk
from megakernel import ops_ref
from megakernel.buffers import INT_POISON, Buffers
from megakernel.packing import pack_weights
from megakernel.scheduler import isa
from megakernel.scheduler.isa import Op

CONFIGS = [
    mk.ModelConfig("awk64", vocab_size=97, hidden_size=192, intermediate_size=160, num_layers=2,
                   num_heads=6, num_kv_heads=2, head_dim=64, rope_theta=10000.0,
                   rope_scaling=mk.RopeScaling(8.0, 1.0, 4.0, 64)),
    mk.ModelConfig("awk128", vocab_size=61, hidden_size=320, intermediate_size=96, num_layers=1,
                   num_heads=4, num_kv_heads=1, head_dim=128),
]
B, S = 3, 24


pytestmark = pytest.mark.usefixtures("one_thread")
POS = torch.tensor([0, 6, 13], dtype=torch.int32)   # per-row positions, row 0 at the start


def one_op_program(cfg, attn_splits=1, lm_slices=1):
    """The Program fields Buffers and the op references read, for a single instruction."""
    return SimpleNamespace(config=cfg, batch=B, num_sms=1, attn_splits=attn_splits,
                           lm_slices=lm_slices, num_counters=1)


def setup(cfg, kv_dtype=torch.float32, **prog_fields):
    torch.manual_seed(0)
    w = mk.Weights.random(cfg, seed=1, dtype=torch.float32, device="cpu")
    prog = one_op_program(cfg, **prog_fields)
    buf = Buffers.allocate(cfg, prog, S, kv_dtype=kv_dtype).poison()
    buf.pos.copy_(POS)
    return w, pack_weights(w), buf, prog


def run(op, buf, pw, prog, layer=-1, **fields):
    ops_ref.run(isa.decode(isa.encode(op, layer=layer, **fields)), pw, buf, prog)


def rms(x, weight, eps):
    return x / torch.sqrt((x * x).mean(-1, keepdim=True) + eps) * weight


def rope(x, pos, buf):
    """x: [B, heads, D] -> rotate_half RoPE at per-row positions."""
    cos = torch.cat([buf.rope_cos[pos.long()]] * 2, -1)[:, None]     # [B, 1, D]
    sin = torch.cat([buf.rope_sin[pos.long()]] * 2, -1)[:, None]
    half = x.shape[-1] // 2
    return x * cos + torch.cat([-x[..., half:], x[..., :half]], -1) * sin


def assert_written_exactly(t, region, expected, atol=1e-5):
    """t[region] == expected and every other element of t still poisoned."""
    torch.testing.assert_close(t[region].float(), expected.float(), rtol=1e-5, atol=atol)
    rest = torch.ones(t.shape, dtype=torch.bool)
    rest[region] = False
    assert torch.isnan(t[rest].float()).all(), "op wrote outside its slice"


@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: c.name)
def test_embed(cfg):
    w, pw, buf, prog = setup(cfg)
    buf.tokens.copy_(torch.tensor([5, cfg.V - 1, 5]))
    run(Op.EMBED, buf, pw, prog, col0=7, ncols=101)
    expected = F.embedding(buf.tokens, w.embed)[:, 7:108]
    assert_written_exactly(buf.resid[0], (slice(None), slice(7, 108)), expected)


@pytest.mark.parametrize("kv_dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: c.name)
def test_qkv_all_slices(cfg, kv_dtype):
    w, pw, buf, prog = setup(cfg, kv_dtype)
    l = cfg.L - 1
    buf.resid[2 * l] = torch.randn(B, cfg.d)
    rows = pw.wqkv.shape[1]
    for r0 in range(0, rows, 38):                       # even slices not aligned to heads
        run(Op.QKV, buf, pw, prog, layer=l, row0=r0, nrows=min(38, rows - r0))
    lw = w.layers[l]
    x = rms(buf.resid[2 * l], lw.attn_norm, cfg.rms_norm_eps)
    q = rope((x @ lw.wq.T).view(B, cfg.H, cfg.D), POS, buf)
    k = rope((x @ lw.wk.T).view(B, cfg.Hkv, cfg.D), POS, buf)
    v = (x @ lw.wv.T).view(B, cfg.Hkv, cfg.D)
    torch.testing.assert_close(buf.q[l], q, rtol=1e-5, atol=1e-5)
    at_pos = (l, torch.arange(B)[:, None], torch.arange(cfg.Hkv)[None], POS.long()[:, None])
    tol = 1e-5 if kv_dtype == torch.float32 else 1e-2
    for cache, ref in ((buf.k_cache, k), (buf.v_cache, v)):
        assert_written_exactly(cache, at_pos, ref.to(kv_dtype), atol=tol)


def test_qkv_one_slice_writes_its_rows_only():
    cfg = CONFIGS[0]
    w, pw, buf, prog = setup(cfg)
    buf.resid[0] = torch.randn(B, cfg.d)
    n = 2 * cfg.D + 10                                  # crosses a head boundary
    run(Op.QKV, buf, pw, prog, layer=0, row0=cfg.D - 4, nrows=n)
    written = sum(int((~torch.isnan(t[0].float())).sum()) for t in (buf.q, buf.k_cache, buf.v_cache))
    assert written == B * n


@pytest.mark.parametrize("q_scale", [1.0, 300.0])   # 300: scores past exp()'s fp32 range
@pytest.mark.parametrize("splits", [1, 4, 17])
@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: c.name)
def test_attn_partials_and_reduce(cfg, splits, q_scale):
    w, pw, buf, prog = setup(cfg, attn_splits=splits)
    l, tol = 0, 1e-5 * q_scale          # fp32 rounding of the scores grows with their scale
    buf.q[l] = torch.randn(B, cfg.H, cfg.D) * q_scale
    for b, p in enumerate(POS.tolist()):                # positions past pos[b] stay NaN
        buf.k_cache[l, b, :, :p + 1] = torch.randn(cfg.Hkv, p + 1, cfg.D)
        buf.v_cache[l, b, :, :p + 1] = torch.randn(cfg.Hkv, p + 1, cfg.D)
    for b in range(B):
        for g in range(cfg.Hkv):
            for s in range(splits):
                run(Op.ATTN, buf, pw, prog, layer=l, b=b, kv_head=g, split=s)
    for b, p in enumerate(POS.tolist()):
        n, c = p + 1, -(-(p + 1) // splits)
        k = buf.k_cache[l, b].repeat_interleave(cfg.G, 0)   # [H, S, D]
        v = buf.v_cache[l, b].repeat_interleave(cfg.G, 0)
        for s in range(splits):
            lo, hi = min(n, s * c), min(n, (s + 1) * c)
            if lo == hi:
                assert (buf.o_part[l, b, :, s] == 0).all()
                assert (buf.lse[l, b, :, s] == -torch.inf).all()
                continue
            scores = torch.einsum("hd,hsd->hs", buf.q[l, b], k[:, lo:hi]) / cfg.D ** 0.5
            expected = torch.einsum("hs,hsd->hd", scores.softmax(-1), v[:, lo:hi])
            torch.testing.assert_close(buf.o_part[l, b, :, s], expected, rtol=1e-5, atol=tol)
            torch.testing.assert_close(buf.lse[l, b, :, s], scores.logsumexp(-1), rtol=1e-5,
                                       atol=tol)
    for b in range(B):   # the group's q heads in two reduces where G > 1
        for g in range(cfg.Hkv):
            for h0, nh in ((0, cfg.G),) if cfg.G == 1 else ((0, 1), (1, cfg.G - 1)):
                run(Op.ATTN_REDUCE, buf, pw, prog, layer=l, b=b, kv_head=g, head0=h0, nheads=nh)
    for b, p in enumerate(POS.tolist()):
        k = buf.k_cache[l, b, :, :p + 1].repeat_interleave(cfg.G, 0)
        v = buf.v_cache[l, b, :, :p + 1].repeat_interleave(cfg.G, 0)
        expected = F.scaled_dot_product_attention(buf.q[l, b][:, None], k, v)   # [H, 1, D]
        torch.testing.assert_close(buf.attn[l, b], expected.reshape(-1), rtol=1e-5, atol=tol)


@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: c.name)
def test_oproj(cfg):
    w, pw, buf, prog = setup(cfg)
    l = cfg.L - 1
    buf.resid[2 * l] = torch.randn(B, cfg.d)
    buf.attn[l] = torch.randn(B, cfg.H * cfg.D)
    run(Op.OPROJ, buf, pw, prog, layer=l, row0=7, nrows=53)
    expected = buf.resid[2 * l, :, 7:60] + buf.attn[l] @ w.layers[l].wo[7:60].T
    assert_written_exactly(buf.resid[2 * l + 1], (slice(None), slice(7, 60)), expected)


@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: c.name)
def test_gateup(cfg):
    w, pw, buf, prog = setup(cfg)
    l = cfg.L - 1
    buf.resid[2 * l + 1] = torch.randn(B, cfg.d)
    run(Op.GATEUP, buf, pw, prog, layer=l, row0=2 * 13, nrows=2 * 29)
    lw = w.layers[l]
    x = rms(buf.resid[2 * l + 1], lw.mlp_norm, cfg.rms_norm_eps)
    expected = F.silu(x @ lw.w_gate[13:42].T) * (x @ lw.w_up[13:42].T)
    assert_written_exactly(buf.act, (l, slice(None), slice(13, 42)), expected)


@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: c.name)
def test_down(cfg):
    w, pw, buf, prog = setup(cfg)
    l = cfg.L - 1
    buf.resid[2 * l + 1] = torch.randn(B, cfg.d)
    buf.act[l] = torch.randn(B, cfg.I)
    run(Op.DOWN, buf, pw, prog, layer=l, row0=3, nrows=cfg.d - 3)
    expected = buf.resid[2 * l + 1, :, 3:] + buf.act[l] @ w.layers[l].w_down[3:].T
    assert_written_exactly(buf.resid[2 * l + 2], (slice(None), slice(3, None)), expected)


@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: c.name)
def test_lmhead_logits_and_partial_argmax(cfg):
    w, pw, buf, prog = setup(cfg, lm_slices=3)
    r0, n = 11, 29
    pw.lm_head[r0 + 9] = pw.lm_head[r0 + 4] = 10 * pw.lm_head[r0 + 4]   # a planted tie
    buf.resid[2 * cfg.L] = torch.randn(B, cfg.d)
    run(Op.LMHEAD, buf, pw, prog, row0=r0, nrows=n, slot=1)
    x = rms(buf.resid[2 * cfg.L], w.final_norm, cfg.rms_norm_eps)
    expected = x @ pw.lm_head[r0:r0 + n].T
    assert_written_exactly(buf.logits, (slice(None), slice(r0, r0 + n)), expected)
    for b in range(B):
        row = buf.logits[b, r0:r0 + n]
        first_max = r0 + int(torch.nonzero(row == row.max())[0])
        assert buf.amax_val[b, 1] == row.max() and buf.amax_idx[b, 1] == first_max
    assert torch.isnan(buf.amax_val[:, [0, 2]]).all()
    assert (buf.amax_idx[:, [0, 2]] == INT_POISON).all()


def test_lmhead_nan_logit_never_wins():
    """A NaN weight row gives NaN logits, which the partial argmax skips (the kernel's
    compare never prefers NaN; torch's argmax alone would return it)."""
    cfg = CONFIGS[0]
    _, pw, buf, prog = setup(cfg, lm_slices=3)
    r0, n = 11, 29
    pw.lm_head[r0 + 3] = float("nan")
    buf.resid[2 * cfg.L] = torch.randn(B, cfg.d)
    run(Op.LMHEAD, buf, pw, prog, row0=r0, nrows=n, slot=1)
    rows = buf.logits[:, r0:r0 + n]
    assert torch.isnan(rows[:, 3]).all()
    want = rows.nan_to_num(nan=-float("inf")).max(-1)
    assert torch.equal(buf.amax_val[:, 1], want.values)
    assert torch.equal(buf.amax_idx[:, 1], (want.indices + r0).to(torch.int32))


def test_argmax_lowest_index_on_ties():
    cfg = CONFIGS[0]
    _, pw, buf, prog = setup(cfg, lm_slices=4)
    buf.amax_val.copy_(torch.tensor([[1.0, 3.0, 3.0, 2.0], [-5.0, -1.0, -2.0, -1.0],
                                     [0.0, 0.0, 0.0, 0.0]]))
    buf.amax_idx.copy_(torch.tensor([[10, 40, 25, 7], [0, 90, 1, 60], [80, 60, 70, 90]],
                                    dtype=torch.int32))
    run(Op.ARGMAX, buf, pw, prog)
    assert buf.out_tokens.tolist() == [25, 60, 60]


def test_unknown_opcodes_raise():
    cfg = CONFIGS[0]
    _, pw, buf, prog = setup(cfg)
    with pytest.raises(ValueError, match="no reference for opcode"):
        run(Op.NOP, buf, pw, prog)
    with pytest.raises(ValueError):
        ops_ref.run(isa.decode(np.array([99] + [0] * (isa.WORDS - 1))), pw, buf, prog)


def test_flagged_partials_layout_and_reset():
    """part_ll (the -DMK_LL_PARTIALS=1 build's flagged partials): unit u of a split holds
    dims 2u, 2u+1 as {x, tag, x', tag}, unit D/2 the lse twice; reset() zeroes the tags
    with the epoch, so a tag of an earlier run never reads as ready."""
    cfg = mk.ModelConfig.preset("tiny")
    _, _, buf, _ = setup(cfg, attn_splits=3)
    buf.o_part.copy_(torch.randn(buf.o_part.shape))
    buf.lse.copy_(torch.randn(buf.lse.shape))
    buf.lse[0, 0, 0, 1] = -float("inf")             # an empty split
    buf.flag_partials(tag=7)
    u = buf.part_ll
    D = cfg.D
    assert u.shape == (*buf.o_part.shape[:-1], D // 2 + 1, 4)
    assert (u[..., 1] == 7).all() and (u[..., 3] == 7).all()
    dims = torch.stack([u[..., :D // 2, 0], u[..., :D // 2, 2]], -1).reshape(buf.o_part.shape)
    assert torch.equal(dims.view(torch.float32), buf.o_part)
    assert torch.equal(u[..., D // 2, 0].view(torch.float32), buf.lse)
    assert torch.equal(u[..., D // 2, 2], u[..., D // 2, 0])
    buf.reset()
    assert not buf.part_ll.any()


def test_flagged_queries_layout():
    """q_ll / kv_ll (the -DMK_LL_Q=1 build's): q unit u holds dims u, u + D/2; the k unit of
    row b's position the same dims of the cache's row pos[b], the v unit dims 2u, 2u + 1."""
    cfg = mk.ModelConfig.preset("tiny")
    _, _, buf, _ = setup(cfg, kv_dtype=torch.bfloat16)
    buf.q.copy_(torch.randn(buf.q.shape))
    buf.k_cache.copy_(torch.randn(buf.k_cache.shape))
    buf.v_cache.copy_(torch.randn(buf.v_cache.shape))
    buf.flag_queries(tag=3)
    half = cfg.D // 2
    q, kv = buf.q_ll, buf.kv_ll
    assert (q[..., 1] == 3).all() and (q[..., 3] == 3).all() and (kv[..., 1::2] == 3).all()
    assert torch.equal(q[..., 0].view(torch.float32), buf.q[..., :half])
    assert torch.equal(q[..., 2].view(torch.float32), buf.q[..., half:])
    for b, p in enumerate(POS.tolist()):
        k, v = buf.k_cache[:, b, :, p].float(), buf.v_cache[:, b, :, p].float()
        assert torch.equal(kv[:, b, :, 0, :, 0].view(torch.float32), k[..., :half])
        assert torch.equal(kv[:, b, :, 0, :, 2].view(torch.float32), k[..., half:])
        assert torch.equal(kv[:, b, :, 1, :, 0].view(torch.float32), v[..., 0::2])
        assert torch.equal(kv[:, b, :, 1, :, 2].view(torch.float32), v[..., 1::2])
    buf.reset()
    assert not buf.q_ll.any() and not buf.kv_ll.any()
