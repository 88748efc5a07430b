import pytest
from _gpu import OP_CONFIGS, assert_close, run_op
from megakernel.scheduler.isa import Op

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("batch", [1, 3, 16])
@pytest.mark.parametrize("name", list(OP_CONFIGS))
def test_lmhead(name, batch):
    cfg = OP_CONFIGS[name]
    row0, n = 17, min(cfg.V - 17, 8192 // batch)
    got, ref = run_op(cfg, batch, Op.LMHEAD, dict(row0=row0, nrows=n, slot=1),
                      poison=[("logits", slice(None)), ("amax_val", (slice(None), 1)),
                              ("amax_idx", (slice(None), 1))])
    assert_close(got, ref, "logits")
    assert_close(got, ref, "amax_val")
    assert_close(got, ref, "amax_idx")
