import pytest
import torch
from _gpu import OP_CONFIGS, assert_close, ll_q_expected, run_op
from megakernel.buffers import flagged_partials
from megakernel.config import ModelConfig
from megakernel.scheduler.isa import Op

pytestmark = pytest.mark.gpu
# G = 4 at D = 64 and 128: ATTN's exact 4-head code (Llama 3.2-1B and 3.1-8B; OP_CONFIGS has
# G = 3, 1 and 8); G = 2 at D = 128: the 8-head code with exits
ATTN_CONFIGS = {**OP_CONFIGS, "d256_g2_D128": ModelConfig(
    "d256g2", vocab_size=1000, hidden_size=256, intermediate_size=200, num_layers=2,
    num_heads=4, num_kv_heads=2, head_dim=128),
    "d512_g4_D64": ModelConfig("d512g4", vocab_size=1000, hidden_size=512,
                               intermediate_size=200, num_layers=2, num_heads=8,
                               num_kv_heads=2, head_dim=64),
    "d512_g4_D128": ModelConfig("d512g4b", vocab_size=1000, hidden_size=512,
                                intermediate_size=200, num_layers=2, num_heads=4,
                                num_kv_heads=1, head_dim=128)}


LL = ("-DMK_LL_PARTIALS=1",)


@pytest.mark.parametrize("flags", [(), ("-DMK_ATTN_EXACT_G=0",), LL, ("-DMK_LL_Q=1",)],
                         ids=["default", "exits", "ll", "ll_q"])
@pytest.mark.parametrize("splits,split", [(1, 0), (3, 2), (5, 1), (7, 6)])
@pytest.mark.parametrize("name", list(ATTN_CONFIGS))
def test_attn(name, splits, split, flags):
    """flags: the default build (exactly 4 heads, interleaved, where G == 4 and D >= 64;
    the 8-head code with per-head exits elsewhere), MK_ATTN_EXACT_G=0 (the 8-head code
    everywhere), MK_LL_PARTIALS=1, which also writes the split's partials as flagged
    pairs tagged epoch + 1 = 1 into part_ll (zero before: nothing else there), and
    MK_LL_Q=1, which takes q and the position's K/V from q_ll / kv_ll (run_op flags them;
    the GPU's cache rows at the positions then hold NaN, so a read of one shows)."""
    cfg = ATTN_CONFIGS[name]
    batch, max_seq = 3, 4200
    positions = [0, 4095, 1234]  # split 6 of 7 over one position is empty
    for b in range(batch):
        g = cfg.Hkv - 1
        got, ref = run_op(cfg, batch, Op.ATTN, dict(b=b, kv_head=g, split=split),
                          layer=1, attn_splits=splits, max_seq=max_seq, positions=positions,
                          poison=[("o_part", 1), ("lse", 1)], build_flags=flags,
                          gpu_only_poison=[(c, (1, r, slice(None), positions[r])) for c in
                                           ("k_cache", "v_cache") for r in range(batch)]
                          if flags == ("-DMK_LL_Q=1",) else ())
        assert_close(got, ref, "o_part")
        assert_close(got, ref, "lse")
        if flags == LL:
            mine = (1, b, slice(g * cfg.G, (g + 1) * cfg.G), split)
            want = flagged_partials(got.o_part, got.lse, tag=1)
            assert torch.equal(got.part_ll[mine], want[mine])
            rest = got.part_ll.clone()
            rest[mine] = 0
            assert not rest.any()


@pytest.mark.parametrize("flags", [(), ("-DMK_LL_Q=0",), ("-DMK_B1_TC=1",)],
                         ids=["default", "no_ll_q", "b1_tc"])
@pytest.mark.parametrize("name", list(ATTN_CONFIGS))
def test_attn_b1(name, flags):
    """Batch 1, where "auto" runs the b1 build wherever the group fits it (G <= 4; the
    default build for G = 8): q and the position's K/V from the flagged pairs (the b1
    build's default, MK_LL_Q; the GPU's cache row at the position then holds NaN, so a read
    of it shows), or the counters and the cache (the other build, -DMK_LL_Q=0, or the b1
    build with its tensor-core matvec compiled in, -DMK_B1_TC=1, which turns MK_LL_Q off)."""
    cfg = ATTN_CONFIGS[name]
    pos, g, info = 1234, cfg.Hkv - 1, {}
    variant = "b1" if cfg.G <= 4 else "default"
    ll_q = ll_q_expected(flags, variant)
    poison = [(c, (1, 0, slice(None), pos)) for c in ("k_cache", "v_cache")]
    got, ref = run_op(cfg, 1, Op.ATTN, dict(b=0, kv_head=g, split=2), layer=1, attn_splits=3,
                      max_seq=1300, positions=[pos], poison=[("o_part", 1), ("lse", 1)],
                      build_flags=flags, info=info, gpu_only_poison=poison if ll_q else ())
    assert (info["variant"], info["ll_q"]) == (variant, ll_q)
    assert_close(got, ref, "o_part")
    assert_close(got, ref, "lse")


@pytest.mark.parametrize("target", [1, 2])
@pytest.mark.parametrize("name", list(OP_CONFIGS))
def test_attn_merge(name, target):
    """A merging split (fuse_reduce): its ticket add reaching the target (1) makes it the
    group's last, and it merges the group's partials (the other splits' random) into attn;
    below the target (2) it leaves attn alone. attn of layer 1 is poisoned first."""
    cfg = OP_CONFIGS[name]
    fields = dict(b=1, kv_head=cfg.Hkv - 1, split=1, merge=1, ticket=0)
    got, ref = run_op(cfg, 2, Op.ATTN, fields, layer=1, attn_splits=3, positions=[5, 77],
                      poison=[("attn", 1)], counter_targets=[target],
                      build_flags=("-DMK_FUSE_REDUCE=1",))
    for buf in ("o_part", "lse", "attn"):
        assert_close(got, ref, buf)
    assert int(got.counters[0]) == int(ref.counters[0]) == 1
    group = got.attn[1, 1].view(cfg.H, cfg.D)[(cfg.Hkv - 1) * (cfg.H // cfg.Hkv):]  # last G
    assert (torch.isfinite(group).all() if target == 1 else torch.isnan(group).all())
