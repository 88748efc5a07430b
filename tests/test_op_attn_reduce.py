import pytest
import torch
from _gpu import OP_CONFIGS, assert_close, run_op
from megakernel.scheduler.isa import Op

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("flags", [(), ("-DMK_LL_PARTIALS=1",)], ids=["default", "ll"])
@pytest.mark.parametrize("heads", ["all", "last", "inner"])
@pytest.mark.parametrize("splits", [1, 4, 13, 40])
@pytest.mark.parametrize("name", list(OP_CONFIGS))
def test_attn_reduce(name, splits, heads, flags):
    """A reduce of all, the last, or the inner q heads of a group; the others stay poisoned.
    MK_LL_PARTIALS=1: the partials come from part_ll (run_op flags the random inputs), no
    counter wait."""
    cfg = OP_CONFIGS[name]
    h0, nh = {"all": (0, cfg.G), "last": (cfg.G - 1, 1),
              "inner": (min(1, cfg.G - 1), max(1, cfg.G - 2))}[heads]
    got, ref = run_op(cfg, 2, Op.ATTN_REDUCE, dict(b=1, kv_head=cfg.Hkv - 1, head0=h0, nheads=nh),
                      layer=1, attn_splits=splits, poison=[("attn", 1)], build_flags=flags)
    assert_close(got, ref, "attn")
    written = got.attn[1, 1].reshape(cfg.H, cfg.D)
    mine = (cfg.Hkv - 1) * cfg.G + h0
    assert not torch.isnan(written[mine:mine + nh]).any()
    assert torch.isnan(written[:mine]).all() and torch.isnan(written[mine + nh:]).all()


def test_attn_reduce_ll_waits_for_its_tags():
    """MK_LL_PARTIALS=1: partials whose tags never read epoch + 1 (layer 1's poisoned) keep
    ATTN_REDUCE polling until the watchdog stops the kernel and names the instruction."""
    cfg = OP_CONFIGS[next(iter(OP_CONFIGS))]
    with pytest.raises(RuntimeError, match="ATTN_REDUCE.*flagged inputs"):
        run_op(cfg, 2, Op.ATTN_REDUCE, dict(b=1, kv_head=0, head0=0, nheads=1), layer=1,
               attn_splits=4, poison=[("part_ll", 1)], build_flags=("-DMK_LL_PARTIALS=1",),
               watchdog_ms=50)
