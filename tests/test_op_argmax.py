import pytest
from _gpu import OP_CONFIGS, assert_close, run_op
from megakernel.scheduler.isa import Op

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("slices", [1, 37, 300])
@pytest.mark.parametrize("batch", [1, 16])
def test_argmax(batch, slices):
    cfg = OP_CONFIGS["d192_g3_D64"]
    got, ref = run_op(cfg, batch, Op.ARGMAX, {}, layer=-1, lm_slices=slices,
                      poison=[("out_tokens", slice(None))])
    assert_close(got, ref, "out_tokens")
    assert bool((got.out_tokens >= 0).all())
