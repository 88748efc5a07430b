"""The ring model (scheduler/ring_model.py): which builds it sees, its page counts against
the kernel's, and how its timeline responds to the ring's shape."""
import dataclasses

import numpy as np
import pytest

from megakernel.config import ModelConfig
from megakernel.scheduler import plan
from megakernel.scheduler.isa import Op
from megakernel.scheduler.ring_model import (RingModel, _weight_bytes, matvec_pages, ring_stamps,
                                             simulate_ring, straggle)

from bench import ablate


def test_for_build_reads_the_ring_flags_and_refuses_the_rest():
    b1, b8 = RingModel.for_build(1), RingModel.for_build(8)
    # batch 1: the batch-1/2 build, 5 pages + the idle staging area; batch 8: 4, tensor cores
    assert (b1.slots, b1.inflight, b1.chain_inflight, b1.act_floats) == (6, 2, 1, 4096)
    assert b1.chain_qkv and b1.chain_down and b1.prefetch
    assert (b8.slots, b8.act_floats) == (4, 8192)
    assert RingModel.for_build(1, variant="default").slots == 5
    assert RingModel.for_build(1, ("-DMK_NUM_PAGES=2",)).slots == 3
    assert RingModel.for_build(1, ("-DMK_RAW_SLOT=0",)).slots == 5
    assert RingModel.for_build(8, ("-DMK_RAW_SLOT=0",)).slots == 4
    assert RingModel.for_build(1, ("-DMK_INFLIGHT_PAGES=0",)).inflight == 0
    off = RingModel.for_build(1, ("-DMK_CHAIN_INFLIGHT=0",))
    assert off.chain_inflight == 0 and not off.chain_qkv and not off.chain_down
    assert not RingModel.for_build(1, ("-DMK_CHAIN_QKV=0",)).chain_qkv
    assert not RingModel.for_build(1, ablate=("no_prefetch",)).prefetch
    for flags, modes in ((("-DMK_LL_X=1",), ()), (("-O2",), ()), ((), ("no_compute",))):
        assert RingModel.for_build(1, flags, modes) is None
    with pytest.raises(ValueError, match="slots"):
        RingModel(slots=0, inflight=2)


@pytest.mark.parametrize("batch, pages", [
    # ring pages per opcode over a 1B step, as the kernel's page stamps counted them in the
    # H100 traces of session 34 (bench/results/h100-20261207-s34/traces_*_864b4d3.txt)
    (1, {Op.QKV: 6144, Op.ATTN_OPROJ: 4096, Op.GATEUP: 33792, Op.DOWN: 16896,
         Op.LMHEAD: 16104}),
    (8, {Op.QKV: 8192, Op.OPROJ: 4224, Op.GATEUP: 33792, Op.DOWN: 16896, Op.LMHEAD: 16104}),
])
def test_pages_match_the_kernels_geometry(batch, pages):
    cfg = ModelConfig.preset("llama-3.2-1b")
    t = plan(cfg, batch=batch, num_sms=132, kv_position=512).table()
    n = matvec_pages(t, cfg, batch, RingModel.for_build(batch).act_floats)
    got = {Op(o): int(n[t.op == o].sum()) for o in np.unique(t.op) if n[t.op == o].any()}
    assert got == pages
    assert (n[np.isin(t.op, [Op.ATTN, Op.ATTN_REDUCE, Op.EMBED, Op.ARGMAX])] == 0).all()


def _program(batch=1):
    return plan(ModelConfig.preset("llama-3.2-1b"), batch=batch, num_sms=132, kv_position=512)


@pytest.mark.parametrize("batch", [1, 8])
def test_timeline_keeps_the_dependencies_and_responds_to_the_ring(batch):
    prog = _program(batch)
    ring = RingModel.for_build(batch)
    tl = simulate_ring(prog, ring)
    assert np.isfinite(tl.end_us).all() and (tl.end_us > tl.start_us).all()
    # every instruction starts after what it waits on ended, plus the counter latency and the
    # expected lag of the last of the range's n signallers
    t = prog.table()
    t = t.take(np.argsort(t.uid, kind="stable"))
    ends, count = {}, np.bincount(t.signal[t.signal >= 0])
    for i in range(len(t)):
        if t.signal[i] >= 0:
            ends[int(t.signal[i])] = max(ends.get(int(t.signal[i]), 0.0), tl.end_us[i])
    lat, spread = prog.gpu.counter_latency_us, prog.gpu.ring_spread_us
    for i in range(0, len(t), 97):
        for first, n in t.wait_ranges(i):
            late = spread * straggle(count[first:first + n].sum())
            last = max(ends[c] for c in range(first, first + n))
            assert tl.start_us[i] >= last + lat + late - 1e-9
    # the streaming floor: no SM gets its pages faster than its share of HBM
    wb = prog.gpu.sm_bytes_per_s(prog.num_sms)
    weights = np.bincount(t.sm, _weight_bytes(t, prog.config, prog.gpu.weight_bytes),
                          minlength=prog.num_sms)
    assert tl.total_us >= weights.max() / wb * 1e6
    # a ring of 1-2 slots is slower; no prefetch across instructions costs 4-10% at batch 1
    # and ~2% at batch 8 on the H100 (bench/NOTES.md, session 37's table)
    base = tl.total_us
    shallow = simulate_ring(prog, RingModel.for_build(batch, ("-DMK_NUM_PAGES=1",))).total_us
    late = simulate_ring(prog, RingModel.for_build(batch, ablate=("no_prefetch",))).total_us
    assert shallow > 1.1 * base
    assert late > 1.05 * base if batch == 1 else abs(late / base - 1) < 0.03


def test_refuses_claims_and_tp():
    cfg = ModelConfig.preset("tiny")
    queue = plan(cfg, batch=1, num_sms=8, policy="queue")
    with pytest.raises(ValueError, match="claim"):
        simulate_ring(queue, RingModel.for_build(1))
    tp = plan(cfg, batch=1, num_sms=8, tp=2)
    with pytest.raises(ValueError, match="one GPU"):
        simulate_ring(tp.ranks[0], RingModel.for_build(1))


def test_ablate_rows_get_the_ring_model_where_it_sees_them():
    cfg = ModelConfig.preset("llama-3.2-1b")
    rows = {r.name: r for r in ablate.grid()}
    got = {}
    for name in ("default", "no_prefetch", "MK_NUM_PAGES=2", "attn_splits=8", "MK_WARP_RELEASE=1",
                 "policy=queue"):
        prog = ablate.plan_row(rows[name], cfg, 1, 512, 132, None)
        got[name] = ablate.ring_ms(rows[name], prog, 1)
    assert got["MK_WARP_RELEASE=1"] is None and got["policy=queue"] is None
    assert got["no_prefetch"] > got["default"] and got["MK_NUM_PAGES=2"] > got["default"]
    assert got["attn_splits=8"] is not None and got["attn_splits=8"] != got["default"]


def test_page_stamps_follow_the_rules():
    prog = _program(1)
    spec = prog.gpu
    ring = RingModel.for_build(1)
    tl, st = ring_stamps(prog, ring, spec)
    assert tl.total_us == simulate_ring(prog, ring).total_us
    t = prog.table()
    n = matvec_pages(t, prog.config, 1, ring.act_floats)
    used = st[..., 3] > 0
    assert (used.sum(axis=1) == np.bincount(t.sm, n, minlength=prog.num_sms)).all()
    issue, start, got, done = (st[..., k][used] for k in range(4))
    assert (got >= issue + spec.ring_mem_latency_us - 1e-9).all()       # landed, then taken
    assert (got >= start).all() and np.allclose(done - got, spec.ring_page_us)
    # a page's slot is the one freed `slots` pages before: issued only once that was done
    for s in range(0, prog.num_sms, 13):
        k = np.flatnonzero(st[s, :, 3] > 0)
        assert (st[s, k[ring.slots:], 0] >= st[s, k[:-ring.slots], 3] - 1e-9).all()


def test_a_dependent_load_queues_behind_the_copies_in_flight():
    prog = _program(1)
    ring = RingModel.for_build(1)
    quick = dataclasses.replace(prog.gpu, ring_queue_us=1e-6)
    slow = dataclasses.replace(prog.gpu, ring_queue_us=1.0)
    a, b = simulate_ring(prog, ring, quick), simulate_ring(prog, ring, slow)
    # ATTN starts under the chain cap with its SM's one copy in flight: its head pays 1 us
    assert b.total_us > a.total_us
    grow = (b.end_us - b.start_us)[b.op == Op.ATTN] - (a.end_us - a.start_us)[a.op == Op.ATTN]
    assert np.allclose(grow, 1.0, atol=1e-3)


def test_straggle_is_the_expected_maximum_of_normal_draws():
    assert straggle(0) == straggle(1) == 0.0
    z = straggle(np.array([2, 4, 16, 132]))
    assert (np.diff(z) > 0).all()
    rng = np.random.default_rng(0)           # against a sample mean of the maximum
    for n, want in zip((2, 4, 16, 132), z):
        assert rng.standard_normal((20000, n)).max(axis=1).mean() == pytest.approx(want, abs=0.03)
