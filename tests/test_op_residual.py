"""OPROJ and DOWN share csrc/ops/residual.cuh."""
import pytest
from _gpu import OP_CONFIGS, assert_close, run_op
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
