import pytest
import torch
from _gpu import OP_CONFIGS, assert_close, run_op
from megakernel.scheduler.isa import Op

pytestmark = pytest.mark.gpu

LL = ("-DMK_LL_PARTIALS=1",)


@pytest.mark.parametrize("flags", [(), LL], ids=["default", "ll"])
@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("name", list(OP_CONFIGS))
def test_attn_oproj(name, batch, flags):
    """The last q head's inner dims merged over their splits and projected onto an inner
    column slice of resid[2l+1] (atomic adds onto its value; the other columns unchanged).
    MK_LL_PARTIALS=1: the partials come from part_ll (run_op flags them) and o_part / lse
    hold NaN on the GPU, so an ATTN_OPROJ that read them instead of polling would show."""
    cfg = OP_CONFIGS[name]
    fields = dict(head=cfg.H - 1, dim0=4, ndims=cfg.D - 8, col0=8, ncols=cfg.d - 24)
    nan = [("o_part", 1), ("lse", 1)] if flags == LL else []
    got, ref = run_op(cfg, batch, Op.ATTN_OPROJ, fields, layer=1, attn_splits=5,
                      build_flags=flags, gpu_only_poison=nan)
    assert_close(got, ref, "resid")             # the reference adds to the slice only
    assert not torch.isnan(got.resid[3]).any()  # nothing of o_part / lse reached it


def test_attn_oproj_ll_waits_for_its_tags():
    """MK_LL_PARTIALS=1: partials whose tags never read epoch + 1 (layer 1's poisoned) keep
    ATTN_OPROJ polling until the watchdog gives up; the instruction still takes its pages
    (the ring stays in step) and the report names it."""
    cfg = OP_CONFIGS[next(iter(OP_CONFIGS))]
    with pytest.raises(RuntimeError, match="ATTN_OPROJ.*flagged inputs"):
        run_op(cfg, 1, Op.ATTN_OPROJ, dict(head=0, dim0=0, ndims=cfg.D, col0=0, ncols=cfg.d),
               layer=1, attn_splits=4, poison=[("part_ll", 1)], build_flags=LL,
               watchdog_ms=50)
