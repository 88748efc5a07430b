"""plan(): lowering, counters, SM assignment and encoding, property-style over random valid
configs, plus an independent executor that runs the counter protocol in random
interleavings of the SM queues for several steps without resetting the counters."""
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from megakernel.config import ModelConfig
from megakernel.scheduler import Op, plan
from megakernel.scheduler import isa
from megakernel.scheduler.access import BUFFERS, accesses, buffer_dims

POLICIES = ("rr", "lpt", "dag")
GRANULARITIES = ("layer", "head", "chunk")


def random_config(rng) -> ModelConfig:
    """head_dim 64/128, GQA 1/4/8, hidden a multiple of 64 but not 128 (explicit head_dim)."""
    D, G, Hkv = int(rng.choice([64, 128])), int(rng.choice([1, 4, 8])), int(rng.integers(1, 4))
    return ModelConfig(
        f"rand-D{D}-G{G}", vocab_size=int(rng.integers(64, 700)),
        hidden_size=64 * int(rng.choice([1, 3, 5, 7])),
        intermediate_size=32 * int(rng.integers(1, 12)), num_layers=int(rng.integers(1, 3)),
        num_heads=G * Hkv, num_kv_heads=Hkv, head_dim=D)


def random_plan(seed: int, **overrides):
    rng = np.random.default_rng(seed)
    kw = dict(batch=int(rng.integers(1, 17)), num_sms=int(rng.integers(1, 40)),
              policy=POLICIES[seed % 3], granularity=GRANULARITIES[(seed // 3) % 3],
              attn_splits=int(rng.integers(1, 6)) if seed % 2 else None)
    if seed % 4 == 1:
        kw["slices"] = int(rng.integers(1, 50))
    if seed % 5 == 2:
        kw["fuse_reduce"] = True
    elif seed % 7 == 3:
        kw.update(fuse_oproj=True, batch=min(kw["batch"], 4))
    kw.update(overrides)
    return plan(random_config(rng), **kw)


def run_steps(prog, seed: int, steps: int = 2) -> None:
    """Execute prog's queues with monotonic counters in a random legal interleaving per step;
    every read must find its element written this step (and accumulated into by every
    accumulation of it), every element written once, each accumulation onto a written one."""
    rng = np.random.default_rng(seed)
    t = prog.table()
    acc = accesses(t, prog.config, prog.batch, prog.attn_splits, prog.lm_slices)
    dims = buffer_dims(prog.config, prog.batch, prog.attn_splits, prog.lm_slices,
                       merged=not (t.op == Op.ATTN_OPROJ).any())
    sizes = {b: int(np.prod([n for _, n in dims[b]])) for b in BUFFERS}
    adds = {b: np.zeros(n, int) for b, n in sizes.items()}      # accumulations per element
    per_inst = [[] for _ in range(len(t))]
    for i, b, s, e, w, a in zip(acc.inst, acc.buf, acc.start, acc.stop, acc.write, acc.add):
        per_inst[i].append((BUFFERS[b], s, e, w, a))
        adds[BUFFERS[b]][s:e] += a
    row = {(int(s), int(k)): i for i, (s, k) in enumerate(zip(t.sm, t.index))}
    targets = prog.counter_targets.astype(np.int64)
    counters = np.zeros(prog.num_counters, np.int64)
    for epoch in range(steps):
        written = {b: np.zeros(n, bool) for b, n in sizes.items()}
        added = {b: np.zeros(n, int) for b, n in sizes.items()}
        head = [0] * prog.num_sms

        def ready(i):
            return all((counters[f:f + n] - targets[f:f + n] * (epoch + 1) >= 0).all()
                       for f, n in t.wait_ranges(i))
        for _ in range(len(t)):
            runnable = [s for s in range(prog.num_sms) if head[s] < prog.queue_len[s]
                        and ready(row[s, head[s]])]
            assert runnable, f"deadlock in step {epoch}: heads {head}"
            s = int(rng.choice(runnable))
            i = row[s, head[s]]
            for b, lo, hi, w, a in per_inst[i]:
                if a:
                    assert written[b][lo:hi].all(), f"{t.where(i)} adds onto unwritten {b}"
                    added[b][lo:hi] += 1
                elif w:
                    assert not written[b][lo:hi].any(), f"{t.where(i)} rewrites {b}"
                    written[b][lo:hi] = True
                else:
                    assert written[b][lo:hi].all(), f"{t.where(i)} reads unwritten {b}"
                    assert (added[b][lo:hi] == adds[b][lo:hi]).all(), \
                        f"{t.where(i)} reads {b} before all its accumulations"
            if t.signal[i] >= 0:
                counters[t.signal[i]] += 1
            if t.op[i] == Op.ATTN and t.args[i, 3]:    # a merging split's ticket
                counters[t.args[i, 4]] += 1
            head[s] += 1
        assert all(w.all() for w in written.values())
        assert np.array_equal(counters, targets * (epoch + 1))


@pytest.mark.parametrize("seed", range(27))
def test_random_plans_are_well_formed_and_run(seed):
    prog = random_plan(seed)
    cfg, B, NS = prog.config, prog.batch, prog.attn_splits
    t = prog.table()
    count = {op: int((t.op == op).sum()) for op in Op}
    assert count[Op.ATTN] == cfg.L * B * cfg.Hkv * NS
    pieces = min(cfg.G, max(1, prog.options["reduce_slices"] // (B * cfg.Hkv)))
    if prog.options["fuse_oproj"]:
        pieces = 0
        assert count[Op.OPROJ] == 0 and count[Op.ATTN_OPROJ] > 0
    if prog.options["fuse_reduce"]:
        pieces = 0
        merging = t.op == Op.ATTN
        assert (t.args[merging, 3] == 1).all()
        assert len(np.unique(t.args[merging, 4])) == cfg.L * B * cfg.Hkv
        assert (prog.counter_targets[t.args[merging, 4]] == NS).all()
    assert count[Op.ATTN_REDUCE] == cfg.L * B * cfg.Hkv * pieces
    assert count[Op.ARGMAX] == 1 and count[Op.LMHEAD] == prog.lm_slices
    assert sorted(t.args[t.op == Op.LMHEAD, 2]) == list(range(prog.lm_slices))
    matvec = np.isin(t.op, [int(o) for o in isa.MATVEC_OPS])
    assert (t.args[matvec, 1] * B <= isa.MAX_ROWS_TIMES_BATCH).all()
    even = np.isin(t.op, [Op.QKV, Op.GATEUP])
    assert (t.args[even, :2] % 2 == 0).all()
    assert prog.num_instructions == len(t) == int(prog.queue_len.sum())
    assert sorted(t.uid) == list(range(len(t)))
    assert (t.signal >= 0).sum() == len(t) - 1 and prog.counter_targets.min() >= 1
    assert (np.diff(t.uid)[np.diff(t.sm) == 0] > 0).all()
    assert not prog.instructions[np.arange(prog.max_len)[None] >= prog.queue_len[:, None]].any()
    if len(t) < 1500:
        run_steps(prog, seed, steps=2)


def test_every_policy_and_granularity_runs_tiny_for_three_steps():
    for policy in POLICIES:
        for granularity in GRANULARITIES:
            prog = plan("tiny", batch=3, num_sms=7, policy=policy, granularity=granularity)
            run_steps(prog, seed=len(policy) + len(granularity), steps=3)


def _stage_counters(prog, op, layer=0):
    t = prog.table()
    return sorted(set(t.signal[(t.op == op) & (t.layer == layer)].tolist()))


def test_counter_layout_follows_granularity():
    cfg = ModelConfig("g", 300, 320, 384, 2, 8, 2, head_dim=64)      # G = 4, 6 * 64 rows/group
    B, NS = 2, 3
    progs = {g: plan(cfg, batch=B, num_sms=9, granularity=g, attn_splits=NS, fuse_oproj=False)
             for g in GRANULARITIES}
    assert progs["layer"].num_counters == 6 * cfg.L + 2
    for g, prog in progs.items():
        qkv, attn = _stage_counters(prog, Op.QKV), _stage_counters(prog, Op.ATTN)
        n_qkv = int(((prog.table().op == Op.QKV) & (prog.table().layer == 0)).sum())
        assert len(qkv) == {"layer": 1, "head": cfg.Hkv, "chunk": n_qkv}[g]
        assert len(attn) == {"layer": 1, "head": B * cfg.Hkv, "chunk": B * cfg.Hkv}[g]
        assert len(_stage_counters(prog, Op.OPROJ)) == 1
        for op in (Op.ATTN_REDUCE, Op.GATEUP, Op.DOWN):
            assert len(_stage_counters(prog, op)) == 1


@pytest.mark.parametrize("granularity", GRANULARITIES)
def test_attn_waits_on_exactly_the_qkv_slices_of_its_group(granularity):
    cfg = ModelConfig("g", 300, 320, 384, 1, 8, 2, head_dim=64)
    R = (cfg.G + 2) * cfg.D
    for qkv_slices in (1, 3, 5, 8):     # group-aligned, and not
        prog = plan(cfg, batch=2, num_sms=6, granularity=granularity, qkv_slices=qkv_slices)
        recs = [r for _, _, r in prog.records()]
        qkv = [r for r in recs if r["op"] == Op.QKV]
        for r in (r for r in recs if r["op"] == Op.ATTN):
            waited = set(range(r["wait0_first"], r["wait0_first"] + r["wait0_count"]))
            need = {q["signal"] for q in qkv if q["row0"] < (r["kv_head"] + 1) * R
                    and q["row0"] + q["nrows"] > r["kv_head"] * R}
            assert need <= waited
            if granularity != "layer":       # nothing extra beyond the buckets it needs
                assert waited == need
            assert r["wait1_count"] == 0


def test_qkv_slices_follow_group_boundaries_and_limits():
    cfg = ModelConfig.preset("llama-3.1-8b")
    R = (cfg.G + 2) * cfg.D
    for batch, target in ((1, 132), (16, 132), (1, 4), (16, 4)):
        prog = plan(cfg, batch=batch, num_sms=132, qkv_slices=target, validate=False)
        q = [r for _, _, r in prog.records() if r["op"] == Op.QKV and r["layer"] == 0]
        for r in q:       # no slice straddles a group boundary
            assert r["row0"] // R == (r["row0"] + r["nrows"] - 1) // R or r["row0"] % R == 0
            assert r["nrows"] * batch <= isa.MAX_ROWS_TIMES_BATCH
        if target >= cfg.Hkv:
            assert len(q) <= max(target, cfg.Hkv * -(-R * batch // isa.MAX_ROWS_TIMES_BATCH))


def test_default_attn_splits_and_slices():
    assert plan("llama-3.2-1b", batch=1, validate=False).attn_splits == 16
    assert plan("llama-3.2-1b", batch=16, validate=False).attn_splits == 1
    assert plan("tiny", num_sms=1000, validate=False).attn_splits == 32
    prog = plan("llama-3.2-1b", batch=1, num_sms=132, validate=False, fuse_oproj=False)
    t = prog.table()
    assert ((t.op == Op.OPROJ) & (t.layer == 0)).sum() == 132
    assert prog.lm_slices == 132
    assert prog.options["slices"] == 132 and prog.options["kv_position"] == 512


@pytest.mark.parametrize("kw, fused", [
    (dict(), True), (dict(batch=4), True), (dict(batch=7), True), (dict(batch=8), False),
    (dict(tp=2), False),
    (dict(fuse_reduce=True), False), (dict(fuse_oproj=False), False)])
def test_fuse_oproj_is_the_default_where_it_applies(kw, fused):
    """fuse_oproj's default (None): ATTN_OPROJ at tp = 1, batch <= 7, without fuse_reduce."""
    prog = plan("tiny", num_sms=6, **kw)
    for p in getattr(prog, "ranks", [prog]):
        assert p.options["fuse_oproj"] is fused
        assert (p.table().op == Op.ATTN_OPROJ).any() == fused
        assert (p.table().op == Op.OPROJ).any() != fused


@pytest.mark.parametrize("kw, match", [
    (dict(batch=0), "batch"), (dict(batch=17), "batch"), (dict(batch=1.5), "batch"),
    (dict(batch=True), "batch"), (dict(num_sms=0), "num_sms"),
    (dict(policy="fifo"), r"policy must be one of \['rr', 'lpt', 'dag', 'queue'\]"),
    (dict(granularity="row"), r"granularity must be one of \['layer', 'head', 'chunk'\]"),
    (dict(tp=0), "tp"), (dict(attn_splits=0), "attn_splits"), (dict(slices=0), "slices"),
    (dict(prefetch=2), "unknown plan options"), (dict(validate="yes"), "validate"),
    (dict(gpu="a100"), "gpu"), (dict(kv_position=-1), "kv_position")])
def test_bad_arguments_name_the_argument(kw, match):
    with pytest.raises(ValueError, match=match):
        plan("tiny", **kw)


def test_tp_must_divide_kv_heads_and_ffn():
    with pytest.raises(ValueError, match="tp=3 must divide num_kv_heads"):
        plan("tiny", tp=3)
    with pytest.raises(ValueError, match="tp=4 must divide intermediate_size"):
        plan(ModelConfig.preset("tiny").replace(num_kv_heads=4, num_heads=4,
                                                intermediate_size=322), tp=4)
    with pytest.raises(ValueError, match="tp must be an int"):
        plan("tiny", tp=0)
    assert plan("tiny", tp=1, num_sms=4).tp == 1
    with pytest.raises(ValueError, match="preset"):
        plan("llama-9")


def test_program_helpers():
    prog = plan("tiny", batch=2, num_sms=5, policy="lpt")
    recs = list(prog.records())
    assert len(recs) == prog.num_instructions
    assert [r["uid"] for sm, _, r in recs if sm == 0] == sorted(r["uid"] for sm, _, r in recs
                                                                 if sm == 0)
    text = prog.summary()
    for s in ("policy lpt", f"instructions {prog.num_instructions}",
              f"counters {prog.num_counters}", "predicted step"):
        assert s in text
    assert prog.predicted_us > 0 and prog.instructions.dtype == np.int32


def test_more_sms_than_instructions_leaves_empty_queues():
    prog = plan("tiny", num_sms=500, slices=2)
    assert (prog.queue_len == 0).sum() > 0
    run_steps(prog, seed=1, steps=1)


def test_llama_70b_plans_at_scale():
    prog = plan("llama-3.1-70b", batch=1, num_sms=132, policy="dag")
    assert 45_000 < prog.num_instructions < 60_000
    floor_us = prog.config.weight_bytes() / 2.95e12 * 1e6
    assert floor_us < prog.predicted_us < 1.3 * floor_us


def test_scheduler_imports_no_torch():
    code = textwrap.dedent("""
        import sys
        sys.modules['torch'] = None          # any `import torch` now raises ImportError
        import megakernel.scheduler as s
        p = s.plan('tiny', batch=2, num_sms=8, policy='dag')
        s.simulate(p)
        from megakernel.scheduler import dump
        assert not any(m.split('.')[0] in ('torch', 'cuda') for m in sys.modules
                       if sys.modules[m] is not None)
        print(p.num_instructions)
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert int(out.stdout) > 0


def test_dump_cli_prints_summaries_and_writes_a_trace(tmp_path, capsys):
    import argparse
    import json
    from megakernel.scheduler import dump
    parser = argparse.ArgumentParser()
    dump.add_arguments(parser)
    trace = tmp_path / "t.json"
    args = parser.parse_args(["--model", "tiny", "--batch", "2", "--num-sms", "6",
                              "--granularity", "head", "--trace", str(trace)])
    assert dump.main(args) == 0
    out = capsys.readouterr().out
    for s in ("per SM", "QKV", "ATTN_OPROJ", "counters:", "predicted step"):
        assert s in out
    assert len(out.splitlines()) < 60
    events = json.loads(trace.read_text())["traceEvents"]
    assert sum(e["ph"] == "X" for e in events) == plan("tiny", batch=2, num_sms=6).num_instructions
    assert dump.main(parser.parse_args(["--model", "tiny", "--tp", "3"])) == 2
    assert dump.main(parser.parse_args(["--model", "tiny", "--tp", "2", "--num-sms", "4"])) == 0
    assert "tp=3 must divide" in capsys.readouterr().err


@pytest.mark.parametrize("granularity", GRANULARITIES)
def test_fuse_oproj_records(granularity):
    """fuse_oproj: per layer QKV, ATTN, ATTN_OPROJ (H heads x dim slices x column slices,
    head-major, each waiting first on the stage that stored its residual's initial value,
    EMBED or the previous DOWN, then on its kv group's ATTN counters of every b), GATEUP
    (waiting on the whole ATTN_OPROJ stage), DOWN; EMBED and every DOWN but the last copy
    into the next level. Column slices: by default the most (a power of two) up to oproj_slices // H."""
    cfg = ModelConfig("g", 300, 320, 384, 3, 8, 2, head_dim=64)     # G = 4, d = 320
    for batch, oproj_slices, col_slices, ndims, ncols in (
            (1, 132, 0, 32, 40), (3, 8, 0, 64, 320), (4, 20, 0, 64, 160), (1, 132, 1, 4, 320),
            (2, 32, 4, 64, 80)):
        prog = plan(cfg, batch=batch, num_sms=9, granularity=granularity, attn_splits=3,
                    oproj_slices=oproj_slices, oproj_col_slices=col_slices, fuse_oproj=True)
        recs = sorted((r for _, _, r in prog.records()), key=lambda r: r["uid"])
        ops = {r["op"] for r in recs}
        assert Op.ATTN_REDUCE not in ops and Op.OPROJ not in ops
        assert [r["copy"] for r in recs if r["op"] == Op.EMBED] == [1]
        for layer in range(cfg.L):
            stage = [r for r in recs if r["op"] == Op.ATTN_OPROJ and r["layer"] == layer]
            assert len(stage) == cfg.H * (cfg.D // ndims) * (cfg.d // ncols)
            assert sorted((r["head"], r["dim0"], r["ndims"], r["col0"], r["ncols"])
                          for r in stage) == [
                (h, j, ndims, c, ncols) for h in range(cfg.H) for j in range(0, cfg.D, ndims)
                for c in range(0, cfg.d, ncols)]
            attn = [r for r in recs if r["op"] == Op.ATTN and r["layer"] == layer]
            writer = (Op.DOWN, layer - 1) if layer else (Op.EMBED, -1)
            resid = {r["signal"] for r in recs if (r["op"], r["layer"]) == writer}
            for r in stage:
                assert set(range(r["wait0_first"], r["wait0_first"] + r["wait0_count"])) == resid
                waited = set(range(r["wait1_first"], r["wait1_first"] + r["wait1_count"]))
                group = {a["signal"] for a in attn if a["kv_head"] == r["head"] // cfg.G}
                assert group <= waited <= {a["signal"] for a in attn}
                if granularity != "layer":   # from the group's b = 0 bucket to its b = B-1
                    assert (min(waited), max(waited)) == (min(group), max(group))
            (signal,) = {r["signal"] for r in stage}
            for r in (r for r in recs if r["op"] == Op.GATEUP and r["layer"] == layer):
                assert (r["wait0_first"], r["wait0_count"]) == (signal, 1)
            copies = {r["copy"] for r in recs if r["op"] == Op.DOWN and r["layer"] == layer}
            assert copies == {int(layer < cfg.L - 1)}
        run_steps(prog, seed=batch, steps=2)


def test_plans_without_fuse_oproj_copy_nothing():
    for kw in (dict(batch=2, fuse_oproj=False), dict(batch=3, fuse_reduce=True),
               dict(tp=2, batch=2), dict(batch=8)):
        prog = plan("tiny", num_sms=6, **kw)
        for p in getattr(prog, "ranks", [prog]):
            t = p.table()
            assert not t.args[np.isin(t.op, [Op.EMBED, Op.DOWN]), 2].any()
            assert not (t.op == Op.ATTN_OPROJ).any()


@pytest.mark.parametrize("kw, match", [
    (dict(tp=2), "fuse_oproj needs tp=1"), (dict(batch=9), r"fuse_oproj supports batch <= 8"),
    (dict(fuse_reduce=True), "fuse_oproj and fuse_reduce exclude each other")])
def test_fuse_oproj_limits(kw, match):
    with pytest.raises(ValueError, match=match):
        plan("tiny", num_sms=4, fuse_oproj=True, **kw)


def test_down_k_slices_records():
    """down_k_slices=4 at 1B batch 8: 132 DOWNs per layer, 33 row slices of ~62 rows times 4
    K slices of 2048 columns; every OPROJ copies; asked for at batch 1, they keep the fused
    O projection (GATEUP copies then)."""
    prog = plan("llama-3.2-1b", batch=8, down_k_slices=4)
    t = prog.table()
    down = t.args[(t.op == Op.DOWN) & (t.layer == 3)]
    assert len(down) == 132 and len({(int(a[0]), int(a[1])) for a in down}) == 33
    assert sorted({(int(a[3]), int(a[4])) for a in down}) == [(k, 2048) for k in
                                                              range(0, 8192, 2048)]
    assert (t.args[t.op == Op.OPROJ, 2] == 1).all() and not (t.op == Op.ATTN_OPROJ).any()
    fused = plan("tiny", batch=1, num_sms=4, down_k_slices=2)
    assert fused.options["fuse_oproj"] and (fused.table().op == Op.ATTN_OPROJ).any()
    whole = plan("llama-3.2-1b", batch=8, down_k_slices=1)
    assert not whole.table().args[whole.table().op == Op.DOWN, 3:5].any()


@pytest.mark.parametrize("model, batch, n", [
    ("llama-3.2-1b", 1, 1), ("llama-3.2-1b", 4, 1), ("llama-3.2-1b", 5, 2),
    ("llama-3.2-1b", 8, 4), ("llama-3.2-1b", 16, 4), ("llama-3.1-8b", 8, 2),
    ("llama-3.1-8b", 16, 2)])
def test_down_k_slices_default(model, batch, n):
    """None: 1 where the O projection is fused and batch <= 4, else the power of
    two nearest 8 * num_sms * batch / d, halved while 8 accumulator copies would not fit (1B
    b16: 8 -> 4, 8B b16: 4 -> 2), fused or not; each the best of those measured on the
    H100."""
    assert plan(model, batch=batch, validate=False).options["down_k_slices"] == n
    if 4 < batch <= 8:
        fused = plan(model, batch=batch, fuse_oproj=True, validate=False)
        assert fused.options["down_k_slices"] == n
    assert plan(model, batch=batch, tp=2, validate=False).ranks[0].options["down_k_slices"] == 1
    odd = ModelConfig("odd-ffn", vocab_size=64, hidden_size=64, intermediate_size=96,
                      num_layers=1, num_heads=1, num_kv_heads=1, head_dim=64)
    assert plan(odd, batch=8, num_sms=4).options["down_k_slices"] == 1


@pytest.mark.parametrize("kw, match", [
    (dict(tp=2), r"down_k_slices=2 needs tp=1 .*got tp=2"),
    (dict(down_k_slices=0), r"down_k_slices must be an int >= 1"),
])
def test_down_k_slices_limits(kw, match):
    with pytest.raises(ValueError, match=match):
        plan("tiny", num_sms=4, **{"down_k_slices": 2, **kw})
    cfg = ModelConfig("odd-ffn", vocab_size=64, hidden_size=64, intermediate_size=96,
                      num_layers=1, num_heads=1, num_kv_heads=1, head_dim=64)
    with pytest.raises(ValueError, match="multiple of 64, got I=96"):
        plan(cfg, num_sms=4, down_k_slices=2)


def test_parse_options_types_and_rejects():
    from megakernel.scheduler.plan import parse_options
    assert parse_options("attn_splits=16,fuse_reduce=1,policy=rr,fold=false") == dict(
        attn_splits=16, fuse_reduce=True, policy="rr", fold=False)
    assert parse_options("") == {}
    for bad, match in (("nope=1", "expected k=v"), ("fuse_reduce=2", "0/1"),
                       ("slices=x", "integer"), ("slices", "expected k=v")):
        with pytest.raises(ValueError, match=match):
            parse_options(bad)
    prog = plan("tiny", num_sms=5, **parse_options("fuse_reduce=1,attn_splits=2"))
    assert prog.options["fuse_reduce"] and prog.attn_splits == 2
    assert parse_options("fuse_oproj=1") == dict(fuse_oproj=True)
    prog = plan("tiny", num_sms=5, **parse_options("fuse_oproj=1"))
    assert prog.options["fuse_oproj"] and not prog.options["fuse_reduce"]
