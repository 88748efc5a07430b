import pytest
import torch
from _gpu import OP_CONFIGS, assert_close, ll_q_expected, ll_x_expected, run_op
from megakernel.buffers import Buffers
from megakernel.scheduler.isa import Op

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("flags", [(), ("-DMK_LL_Q=1",), ("-DMK_LL_Q=0",), ("-DMK_LL_X=1",)],
                         ids=["default", "ll_q", "no_ll_q", "ll_x"])
@pytest.mark.parametrize("batch", [1, 3, 16])
@pytest.mark.parametrize("name", list(OP_CONFIGS))
def test_qkv(name, batch, flags):
    """With MK_LL_Q (the batch-1/2 build's default, or -DMK_LL_Q=1) QKV also writes every q
    pair and the position's k / v pairs it stores as flagged pairs tagged 1 (epoch 0) into
    q_ll / kv_ll, and nothing else there; without it (the other build's default, or
    -DMK_LL_Q=0) nothing there. -DMK_LL_X=1: where the batch-1/2 build runs (batch 1 of
    groups of at most 4 heads) it stages its input from the flagged elements of x_ll[0],
    not from resid[2], which the GPU then holds as NaN (run_op)."""
    cfg = OP_CONFIGS[name]
    rows = cfg.Hkv * (cfg.G + 2) * cfg.D
    row0, n = 2 * (rows // 7), min(2 * (rows // 3), (8192 // batch) & ~1)
    positions = [(7 * b + 3) % 96 for b in range(batch)]
    poison = [("q", 1)] + [(c, (1, b, slice(None), positions[b])) for c in ("k_cache", "v_cache")
                           for b in range(batch)]
    info = {}
    got, ref = run_op(cfg, batch, Op.QKV, dict(row0=row0, nrows=n), layer=1,
                      positions=positions, poison=poison, build_flags=flags, info=info)
    assert info["ll_x"] == ll_x_expected(flags, cfg, batch)
    assert_close(got, ref, "q")
    # bf16 stores: one rounding step of 2^-8 relative
    assert_close(got, ref, "k_cache", rtol=1e-2, atol=1e-2)
    assert_close(got, ref, "v_cache", rtol=1e-2, atol=1e-2)
    assert info["ll_q"] == ll_q_expected(flags, info["variant"])
    if not info["ll_q"]:
        assert not got.q_ll.any() and not got.kv_ll.any()
        return
    want = Buffers(**{k: v.clone() for k, v in got.tensors().items()}).flag_queries(tag=1)
    for name in ("q_ll", "kv_ll"):
        g, w = getattr(got, name), getattr(want, name)
        written = g[..., 1] != 0   # kv_ll: none where the slice holds no k / v rows
        assert torch.equal(g[written], w[written]), name
        assert not g[~written].any(), name
    half = cfg.D // 2
    assert (got.q_ll[..., 1] != 0).any()
    assert torch.equal(got.q_ll[..., 1] != 0, ~torch.isnan(got.q[..., :half]) & (
        torch.arange(cfg.L) == 1).view(-1, 1, 1, 1))
    for b, p in enumerate(positions):
        k = got.k_cache[1, b, :, p].float()
        assert torch.equal(got.kv_ll[1, b, :, 0, :, 1] != 0, ~torch.isnan(k[..., :half]))
