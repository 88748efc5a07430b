import pytest
from _gpu import OP_CONFIGS, assert_close, run_op
from megakernel.scheduler.isa import Op

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("batch", [1, 5, 16])
@pytest.mark.parametrize("name", list(OP_CONFIGS))
def test_embed(name, batch):
    cfg = OP_CONFIGS[name]
    col0, n = 8, cfg.d - 24
    got, ref = run_op(cfg, batch, Op.EMBED, dict(col0=col0, ncols=n), layer=-1,
                      poison=[("resid", 0)])
    assert_close(got, ref, "resid", rtol=0, atol=0)
