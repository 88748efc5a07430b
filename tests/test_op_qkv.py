import pytest
from _gpu import OP_CONFIGS, assert_close, run_op
from megakernel.scheduler.isa import Op

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("batch", [1, 3, 16])
@pytest.mark.parametrize("name", list(OP_CONFIGS))
def test_qkv(name, batch):
    cfg = OP_CONFIGS[name]
    rows = cfg.Hkv * (cfg.G + 2) * cfg.D
    row0, n = 2 * (rows // 7), min(2 * (rows // 3), (8192 // batch) & ~1)
    positions = [(7 * b + 3) % 96 for b in range(batch)]
    poison = [("q", 1)] + [(c, (1, b, slice(None), positions[b])) for c in ("k_cache", "v_cache")
                           for b in range(batch)]
    got, ref = run_op(cfg, batch, Op.QKV, dict(row0=row0, nrows=n), layer=1,
                      positions=positions, poison=poison)
    assert_close(got, ref, "q")
    # bf16 stores: one rounding step of 2^-8 relative
    assert_close(got, ref, "k_cache", rtol=1e-2, atol=1e-2)
    assert_close(got, ref, "v_cache", rtol=1e-2, atol=1e-2)
