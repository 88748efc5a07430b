import pytest
from _gpu import OP_CONFIGS, assert_close, run_op
from megakernel.scheduler.isa import Op

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("splits", [1, 4, 13])
@pytest.mark.parametrize("name", list(OP_CONFIGS))
def test_attn_reduce(name, splits):
    cfg = OP_CONFIGS[name]
    got, ref = run_op(cfg, 2, Op.ATTN_REDUCE, dict(b=1, kv_head=0), layer=1,
                      attn_splits=splits, poison=[("attn", 1)])
    assert_close(got, ref, "attn")
