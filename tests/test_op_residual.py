"""OPROJ and DOWN share csrc/ops/residual.cuh."""
import pytest
import torch
from _gpu import OP_CONFIGS, assert_close, ll_x_expected, run_op
from megakernel.scheduler.isa import Op

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("op,dst", [(Op.OPROJ, 3), (Op.DOWN, 4)])
@pytest.mark.parametrize("batch", [1, 4, 16])
@pytest.mark.parametrize("name", list(OP_CONFIGS))
def test_residual(name, batch, op, dst):
    cfg = OP_CONFIGS[name]
    row0, n = 5, min(cfg.d - 11, 8192 // batch)
    got, ref = run_op(cfg, batch, op, dict(row0=row0, nrows=n), layer=1, poison=[("resid", dst)])
    assert_close(got, ref, "resid")


@pytest.mark.parametrize("op,dst", [(Op.OPROJ, 3), (Op.DOWN, 4)])
@pytest.mark.parametrize("batch", [1, 2, 16])
@pytest.mark.parametrize("name", list(OP_CONFIGS))
def test_residual_ll_x(name, batch, op, dst):
    """-DMK_LL_X=1 (the batch-1/2 build's: batches 1, 2, groups of at most 4 heads): a DOWN
    of layer l also stores each residual element it writes into x_ll[l] as {x bits, tag
    epoch + 1}; OPROJ stores none, nor does the other build (batch 16, 8-head groups). Rows [5, 5 + n) of layer 1 here, nothing else."""
    cfg = OP_CONFIGS[name]
    row0, n = 5, min(cfg.d - 11, 8192 // batch)
    info = {}
    got, ref = run_op(cfg, batch, op, dict(row0=row0, nrows=n), layer=1, poison=[("resid", dst)],
                      build_flags=("-DMK_LL_X=1",), info=info)
    assert_close(got, ref, "resid")
    assert info["ll_x"] == ll_x_expected(("-DMK_LL_X=1",), cfg, batch)
    want = torch.zeros_like(got.x_ll)
    if op == Op.DOWN and info["ll_x"]:
        rows = slice(row0, row0 + n)
        want[1, :, rows, 0] = got.resid[4, :, rows].contiguous().view(torch.int32)
        want[1, :, rows, 1] = 1
        assert not torch.isnan(got.resid[4, :, rows]).any()
    assert torch.equal(got.x_ll, want)
