import pytest
from _gpu import OP_CONFIGS, assert_close, run_op
from megakernel.scheduler.isa import Op

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("batch", [1, 2, 16])
@pytest.mark.parametrize("name", list(OP_CONFIGS))
def test_gateup(name, batch):
    cfg = OP_CONFIGS[name]
    row0, n = 6, min(2 * cfg.I - 10, (8192 // batch) & ~1)
    got, ref = run_op(cfg, batch, Op.GATEUP, dict(row0=row0, nrows=n), layer=1,
                      poison=[("act", 1)])
    assert_close(got, ref, "act")
