import pytest
import torch
from _gpu import OP_CONFIGS, assert_close, ll_x_expected, run_op
from megakernel.scheduler.isa import Op

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("flags", [(), ("-DMK_LL_X=1",)], ids=["default", "ll_x"])
@pytest.mark.parametrize("batch", [1, 3, 16])
@pytest.mark.parametrize("name", list(OP_CONFIGS))
def test_lmhead(name, batch, flags):
    """-DMK_LL_X=1: where the batch-1/2 build runs (batch 1, groups of at most 4 heads) the
    input comes from the flagged elements of x_ll[L-1], not from resid[2L], which the GPU
    then holds as NaN (run_op)."""
    cfg = OP_CONFIGS[name]
    row0, n = 17, min(cfg.V - 17, 8192 // batch)
    info = {}
    got, ref = run_op(cfg, batch, Op.LMHEAD, dict(row0=row0, nrows=n, slot=1),
                      poison=[("logits", slice(None)), ("amax_val", (slice(None), 1)),
                              ("amax_idx", (slice(None), 1))], build_flags=flags, info=info)
    assert info["ll_x"] == ll_x_expected(flags, cfg, batch)
    assert_close(got, ref, "logits")
    assert_close(got, ref, "amax_val")
    assert_close(got, ref, "amax_idx")


@pytest.mark.parametrize("batch", [1, 8, 11])
def test_lmhead_argmax_ties_and_nan(batch):
    """Vocab rows 40 and 300 have identical weights (tied logits: the lower index wins),
    row 500 holds NaN (its logits are NaN and never win), and row 299 is the tie's rows
    scaled by 1/4 (always lower than them where their logit is positive)."""
    cfg = OP_CONFIGS["d256_g8_D128"]
    row0, n = 17, min(cfg.V - 17, 8192 // batch)

    def edit(w):
        w.lm_head[300] = w.lm_head[40]
        w.lm_head[299] = w.lm_head[40] / 4
        w.lm_head[500] = float("nan")
    got, ref = run_op(cfg, batch, Op.LMHEAD, dict(row0=row0, nrows=n, slot=1),
                      poison=[("logits", slice(None)), ("amax_val", (slice(None), 1)),
                              ("amax_idx", (slice(None), 1))], edit_weights=edit)
    assert torch.equal(got.logits[:, 40], got.logits[:, 300])
    assert torch.isnan(got.logits[:, 500]).all()
    assert_close(got, ref, "logits")
    assert_close(got, ref, "amax_idx")
    assert_close(got, ref, "amax_val")
    assert not (got.amax_idx[:, 1] == 300).any() and not (got.amax_idx[:, 1] == 500).any()
