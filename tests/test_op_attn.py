import pytest
from _gpu import OP_CONFIGS, assert_close, run_op
from megakernel.scheduler.isa import Op

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("splits,split", [(1, 0), (3, 2), (5, 1), (7, 6)])
@pytest.mark.parametrize("name", list(OP_CONFIGS))
def test_attn(name, splits, split):
    cfg = OP_CONFIGS[name]
    batch, max_seq = 3, 4200
    positions = [0, 4095, 1234]  # split 6 of 7 over one position is empty
    for b in range(batch):
        got, ref = run_op(cfg, batch, Op.ATTN, dict(b=b, kv_head=cfg.Hkv - 1, split=split),
                          layer=1, attn_splits=splits, max_seq=max_seq, positions=positions,
                          poison=[("o_part", 1), ("lse", 1)])
        assert_close(got, ref, "o_part")
        assert_close(got, ref, "lse")
