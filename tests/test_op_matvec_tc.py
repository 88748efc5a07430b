"""The tensor-core matvec (csrc/matvec_tc.cuh) under every matvec opcode, at batches of each
of its buckets (3, 4, 5, 8: one 8-column n-tile; 13, 16: two), on shapes the per-op tests
do not reach: K = 8 mod 16 (a last k-step of 8 columns) and larger than one activation
chunk, row counts that are not multiples of 16, one row group (partial sums carried across
pages in registers) and many (shared atomics per page, or per-warp copies of the sums)."""
import pytest
from _gpu import assert_close, run_op
from megakernel import ModelConfig
from megakernel.scheduler import isa
from megakernel.scheduler.isa import Op

pytestmark = pytest.mark.gpu

# d and I = 8 mod 16 and above one chunk (1024 columns at batch <= 8, 512 above); H*D = 1536
# (head dims are multiples of 32) spans two chunks; GQA 8.
CFG = ModelConfig("d1096", vocab_size=1001, hidden_size=1096, intermediate_size=1544,
                  num_layers=2, num_heads=24, num_kv_heads=3, head_dim=64)
BATCHES = [3, 4, 5, 8, 13, 16]


def _rows(op, batch, size):
    """(row0, n): `few` fit one page's row group (16 rows at batch <= 8, 31 above), `mid`
    spans several groups and 8 copies of its accumulators fit (MK_TC_WARP_ACC), `many` is
    as many as the accumulators hold; none is a multiple of 16."""
    total = {Op.QKV: CFG.Hkv * (CFG.G + 2) * CFG.D, Op.OPROJ: CFG.d, Op.GATEUP: 2 * CFG.I,
             Op.DOWN: CFG.d, Op.LMHEAD: CFG.V}[op]
    row0 = 6
    n = {"few": 14, "mid": 62}.get(size, min(total - row0, isa.MAX_ROWS_TIMES_BATCH // batch - 6))
    return row0, n & ~1  # QKV and GATEUP take row pairs


@pytest.mark.parametrize("flags", [(), ("-DMK_TC_WARP_ACC=0",)], ids=["default", "shared_acc"])
@pytest.mark.parametrize("size", ["few", "mid", "many"])
@pytest.mark.parametrize("batch", BATCHES)
@pytest.mark.parametrize("op", [Op.QKV, Op.OPROJ, Op.GATEUP, Op.DOWN, Op.LMHEAD],
                         ids=lambda o: o.name)
def test_matvec_tc(op, batch, size, flags):
    """The default flushes `mid`'s shared tiles into per-warp copies of acc (8 fit);
    -DMK_TC_WARP_ACC=0 flushes them with shared atomics, as `many`'s always are."""
    row0, n = _rows(op, batch, size)
    layer = 0 if op == Op.LMHEAD else 1
    fields = dict(row0=row0, nrows=n)
    positions = None
    if op == Op.QKV:
        positions = [(7 * b + 3) % 96 for b in range(batch)]
        poison = [("q", 1)] + [(c, (1, b, slice(None), positions[b]))
                               for c in ("k_cache", "v_cache") for b in range(batch)]
        checks = [("q", 1e-4), ("k_cache", 1e-2), ("v_cache", 1e-2)]  # bf16 caches
    elif op in (Op.OPROJ, Op.DOWN):
        dst = 3 if op == Op.OPROJ else 4
        poison, checks = [("resid", dst)], [("resid", 1e-4)]
    elif op == Op.GATEUP:
        poison, checks = [("act", 1)], [("act", 1e-4)]
    else:
        fields["slot"] = 1
        poison = [("logits", slice(None)), ("amax_val", (slice(None), 1)),
                  ("amax_idx", (slice(None), 1))]
        checks = [("logits", 1e-4), ("amax_val", 1e-4), ("amax_idx", 0)]
    got, ref = run_op(CFG, batch, op, fields, layer=layer, positions=positions, poison=poison,
                      build_flags=flags)
    for name, tol in checks:
        assert_close(got, ref, name, rtol=tol, atol=tol)
