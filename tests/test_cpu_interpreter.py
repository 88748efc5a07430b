"""CpuInterpreter against ReferenceModel (fp32, max|diff| / max|ref| <= 1e-5) under every
policy, granularity and several interleavings; greedy tokens; monotonic counters; the
deadlock report; input checks. `staged_program` is a Program built by hand (a barrier
counter per stage), so the interpreter is also checked independently of the scheduler."""
import argparse
import dataclasses
import random
from types import SimpleNamespace

import numpy as np
import pytest
import torch

import megakernel as mk
from megakernel import demo, ops_ref
from megakernel.buffers import INT_POISON
from megakernel.cpu_interpreter import CpuInterpreter
from megakernel.scheduler import isa
from megakernel.scheduler.isa import Op

TINY = mk.ModelConfig.preset("tiny")
REL_TOL = 1e-5


pytestmark = pytest.mark.usefixtures("one_thread")


def chunks(total, pieces, align=1):
    size = -(-total // (pieces * align)) * align
    return [(r, min(size, total - r)) for r in range(0, total, size)]


def staged_program(cfg, batch, num_sms=3, splits=2, lm_slices=3, pieces=3):
    """Round-robin over SMs in stage order; stage s waits for all of stage s-1 (counter s-1)."""
    stages = [[(Op.EMBED, -1, dict(col0=c, ncols=n)) for c, n in chunks(cfg.d, pieces)]]
    for l in range(cfg.L):
        heads = [(b, g) for b in range(batch) for g in range(cfg.Hkv)]
        stages += [
            [(Op.QKV, l, dict(row0=r, nrows=n))
             for r, n in chunks(cfg.Hkv * (cfg.G + 2) * cfg.D, pieces, 2)],
            [(Op.ATTN, l, dict(b=b, kv_head=g, split=s)) for b, g in heads for s in range(splits)],
            [(Op.ATTN_REDUCE, l, dict(b=b, kv_head=g, head0=0, nheads=cfg.G)) for b, g in heads],
            [(Op.OPROJ, l, dict(row0=r, nrows=n)) for r, n in chunks(cfg.d, pieces)],
            [(Op.GATEUP, l, dict(row0=r, nrows=n)) for r, n in chunks(2 * cfg.I, pieces, 2)],
            [(Op.DOWN, l, dict(row0=r, nrows=n)) for r, n in chunks(cfg.d, pieces)]]
    lm = chunks(cfg.V, lm_slices)
    stages += [[(Op.LMHEAD, -1, dict(row0=r, nrows=n, slot=i)) for i, (r, n) in enumerate(lm)],
               [(Op.ARGMAX, -1, {})]]
    queues = [[] for _ in range(num_sms)]
    uid = 0
    for s, stage in enumerate(stages):
        for op, layer, fields in stage:
            waits = [(s - 1, 1)] if s else []
            queues[uid % num_sms].append(isa.encode(op, layer, uid, waits, signal=s, **fields))
            uid += 1
    instructions = np.zeros((num_sms, max(map(len, queues)) + 1, isa.WORDS), np.int32)
    for sm, q in enumerate(queues):
        instructions[sm, :len(q)] = q
    return SimpleNamespace(
        config=cfg, batch=batch, num_sms=num_sms, attn_splits=splits, lm_slices=len(lm),
        instructions=instructions, queue_len=np.array(list(map(len, queues)), np.int32),
        claim=np.zeros((0, isa.WORDS), np.int32),
        counter_targets=np.array(list(map(len, stages)), np.int32), num_counters=len(stages),
        policy="staged")


def rel_err(out, ref):
    return float((out - ref).abs().max() / ref.abs().max())


def compare(cfg, prog, steps, seed=0, max_seq=64, **options):
    """Max relative error of the interpreter's logits over `steps` decode steps."""
    w = mk.Weights.random(cfg, seed=seed, dtype=torch.float32, device="cpu")
    ref = mk.ReferenceModel(cfg, w, batch=prog.batch, max_seq=max_seq, dtype=torch.float32)
    cpu = CpuInterpreter(cfg, w, prog, max_seq=max_seq, seed=seed, **options)
    gen = torch.Generator().manual_seed(seed)
    worst = 0.0
    for _ in range(steps):
        tokens = torch.randint(0, cfg.V, (prog.batch,), generator=gen)
        expected = ref.step(tokens)
        worst = max(worst, rel_err(cpu.step(tokens), expected))
        assert torch.equal(cpu.out_tokens, expected.argmax(-1))
    return worst


def random_config(rng: random.Random, D: int, G: int):
    """Small vocab and depth; hidden a multiple of 64 but not of 128; head_dim explicit."""
    Hkv = rng.choice([1, 2, 3])
    return mk.ModelConfig(
        f"rand-D{D}-G{G}", vocab_size=rng.randrange(40, 300),
        hidden_size=64 * rng.choice([1, 3, 5, 7]), intermediate_size=2 * rng.randrange(16, 200),
        num_layers=rng.choice([1, 2]), num_heads=G * Hkv, num_kv_heads=Hkv, head_dim=D,
        rope_theta=rng.choice([10000.0, 500000.0]), tie_word_embeddings=rng.random() < 0.5,
        rope_scaling=rng.choice([None, mk.RopeScaling(8.0, 1.0, 4.0, 32)]))


@pytest.mark.parametrize("splits", [1, 3, 7])
def test_staged_program_matches_reference(splits):
    assert compare(TINY, staged_program(TINY, batch=3, splits=splits), steps=5) <= REL_TOL


@pytest.mark.parametrize("policy", ["rr", "lpt", "dag", "queue"])
@pytest.mark.parametrize("granularity", ["layer", "head", "chunk"])
def test_tiny_matches_reference(policy, granularity):
    for seed, batch in ((0, 1), (1, 2), (2, 5)):
        prog = mk.plan(TINY, batch=batch, num_sms=8, policy=policy, granularity=granularity)
        assert compare(TINY, prog, steps=6, seed=seed) <= REL_TOL


@pytest.mark.parametrize("draw", range(3))
@pytest.mark.parametrize("G", [1, 4, 8])
@pytest.mark.parametrize("D", [64, 128])
def test_random_configs_match_reference(D, G, draw):
    rng = random.Random(f"{D}-{G}-{draw}")
    cfg, batch = random_config(rng, D, G), rng.randint(1, 8)
    for policy in ("rr", "lpt", "dag"):
        prog = mk.plan(cfg, batch=batch, num_sms=rng.choice([3, 8, 13]), policy=policy,
                       granularity=rng.choice(["layer", "head", "chunk"]),
                       attn_splits=rng.choice([None, 1, 2, 5]))
        err = compare(cfg, prog, steps=6, seed=rng.randrange(100))
        assert err <= REL_TOL, (cfg, batch, policy, prog.granularity, prog.attn_splits, err)


@pytest.mark.parametrize("granularity", ["layer", "head", "chunk"])
@pytest.mark.parametrize("G", [1, 4, 8])
def test_fused_reduce_matches_reference(G, granularity):
    """plan(fuse_reduce=True): no ATTN_REDUCE; the last ATTN split of each group (a
    different one in each random interleaving and step) merges it."""
    rng = random.Random(f"fused-{G}-{granularity}")
    cfg = random_config(rng, 64, G)
    for seed, (batch, splits) in enumerate(((1, None), (3, 4), (2, 1))):
        prog = mk.plan(cfg, batch=batch, num_sms=7, granularity=granularity,
                       attn_splits=splits, fuse_reduce=True)
        ops = prog.table().op
        assert (ops == Op.ATTN_REDUCE).sum() == 0 and (ops == Op.ATTN).sum() > 0
        assert compare(cfg, prog, steps=4, seed=seed) <= REL_TOL


def test_fused_reduce_merges_once_per_group_and_step(monkeypatch):
    """Exactly one split of every group takes the last ticket in a step: poisoning attn
    before the step leaves no element unmerged, and a second merge would be a second
    writer (the counters end every step at NS * epoch)."""
    prog = mk.plan(TINY, batch=2, num_sms=5, attn_splits=3, fuse_reduce=True)
    w = mk.Weights.random(TINY, seed=0, dtype=torch.float32, device="cpu")
    cpu = CpuInterpreter(TINY, w, prog, max_seq=16, seed=0)
    calls = []
    real = ops_ref._merge
    monkeypatch.setattr(ops_ref, "_merge", lambda *a: (calls.append(a[2:]), real(*a))[1])
    for step in range(3):
        cpu.buffers.attn.fill_(float("nan"))
        calls.clear()
        cpu.step(torch.tensor([1, 2]))
        assert torch.isfinite(cpu.buffers.attn).all()
        assert sorted(calls) == sorted((l, b, g * TINY.G, TINY.G) for l in range(TINY.L)
                                       for b in range(2) for g in range(TINY.Hkv))


@pytest.mark.parametrize("granularity", ["layer", "head", "chunk"])
@pytest.mark.parametrize("G", [1, 4, 8])
def test_fused_oproj_matches_reference(G, granularity):
    """plan(fuse_oproj=True): ATTN_OPROJ merges a q head's dim slice of every b and adds its
    O projection of a column slice onto the residual copies EMBED and DOWN store (in the
    interleaving's order), from wo_t; whole rows (oproj_col_slices=1) or column slices."""
    rng = random.Random(f"oproj-{G}-{granularity}")
    cfg = random_config(rng, 64, G).replace(num_layers=2)
    for seed, (batch, splits, oproj_slices, col_slices) in enumerate((
            (1, None, None, 0), (2, 3, 8, 0), (4, 1, 1, 0), (4, 5, 1000, 0),
            (1, None, 1000, 1), (2, 3, None, 1))):
        kw = dict(oproj_col_slices=col_slices)
        if oproj_slices is not None:
            kw.update(oproj_slices=oproj_slices)
        prog = mk.plan(cfg, batch=batch, num_sms=7, granularity=granularity,
                       attn_splits=splits, fuse_oproj=True, **kw)
        ops = prog.table().op
        assert not np.isin(ops, [Op.ATTN_REDUCE, Op.OPROJ]).any()
        assert compare(cfg, prog, steps=4, seed=seed) <= REL_TOL


@pytest.mark.parametrize("batch, splits", [(1, None), (2, 3), (4, 2)])
def test_tiny_fused_oproj_matches_reference(batch, splits):
    prog = mk.plan(TINY, batch=batch, num_sms=8, attn_splits=splits, fuse_oproj=True)
    assert compare(TINY, prog, steps=6, seed=batch) <= REL_TOL


@pytest.mark.parametrize("granularity", ["layer", "chunk"])
@pytest.mark.parametrize("G", [1, 4])
def test_down_k_slices_match_reference(G, granularity):
    """plan(down_k_slices=n): each DOWN row slice in n K slices that add onto the copy of
    resid[2l+1] OPROJ stores; FFN widths a multiple of 64, n from 2 to more than its units."""
    rng = random.Random(f"downk-{G}-{granularity}")
    cfg = random_config(rng, 64, G).replace(num_layers=2,
                                            intermediate_size=64 * rng.randrange(3, 9))
    for seed, (batch, n) in enumerate(((1, 2), (3, 3), (8, 4), (2, 100))):
        prog = mk.plan(cfg, batch=batch, num_sms=7, granularity=granularity, down_k_slices=n)
        t = prog.table()
        kn = t.args[t.op == Op.DOWN, 4]
        assert (kn > 0).all() and len(set(kn.tolist())) >= 1
        assert (t.args[t.op == Op.OPROJ, 2] == 1).all()
        assert compare(cfg, prog, steps=4, seed=seed) <= REL_TOL


@pytest.mark.parametrize("granularity", ["layer", "head", "chunk"])
@pytest.mark.parametrize("G", [1, 4])
def test_fused_oproj_with_down_k_slices_matches_reference(G, granularity):
    """plan(fuse_oproj=True, down_k_slices=n): GATEUP copies resid[2l+1] into resid[2l+2] and
    resid[2l+3]; the DOWN K slices add into both, the next ATTN_OPROJ into the second; batch
    1 to 8, n from 2 to more than I's units, column slices or whole rows."""
    rng = random.Random(f"fused-downk-{G}-{granularity}")
    cfg = random_config(rng, 64, G).replace(num_layers=3,
                                            intermediate_size=64 * rng.randrange(3, 9))
    for seed, (batch, n, col_slices) in enumerate(((1, 2, 0), (3, 3, 0), (5, 2, 1), (8, 4, 0),
                                                    (8, 100, 1), (6, 5, 0))):
        prog = mk.plan(cfg, batch=batch, num_sms=7, granularity=granularity, fuse_oproj=True,
                       down_k_slices=n, oproj_col_slices=col_slices)
        t = prog.table()
        assert (t.op == Op.ATTN_OPROJ).any() and (t.args[t.op == Op.DOWN, 4] > 0).all()
        assert set(t.args[t.op == Op.GATEUP, 5].tolist()) == {1, 2}
        assert compare(cfg, prog, steps=4, seed=seed) <= REL_TOL


def test_attn_oproj_needs_wo_t():
    """The interpreter adds wo_t for a program with ATTN_OPROJ; weights without it raise."""
    prog = mk.plan(TINY, batch=1, num_sms=4, fuse_oproj=True)
    w = mk.Weights.random(TINY, seed=0, dtype=torch.float32, device="cpu")
    cpu = CpuInterpreter(TINY, w, prog, max_seq=8)
    assert torch.equal(cpu.weights.wo_t, cpu.weights.wo.transpose(1, 2))
    assert cpu.weights.wo_t.is_contiguous()
    unfused = mk.plan(TINY, num_sms=4, fuse_oproj=False)
    assert CpuInterpreter(TINY, w, unfused, max_seq=8).weights.wo_t is None
    claimed = mk.plan(TINY, batch=1, num_sms=4, policy="queue")    # ATTN_OPROJ only claimed
    assert CpuInterpreter(TINY, w, claimed, max_seq=8).weights.wo_t is not None
    cpu.rank_weights = [dataclasses.replace(cpu.weights, wo_t=None)]
    with pytest.raises(ValueError, match="ATTN_OPROJ reads wo_t.*add_wo_t"):
        cpu.step(torch.tensor([1]))
    moved = mk.add_wo_t(cpu.weights).to(dtype=torch.bfloat16)
    assert moved.wo_t.dtype == torch.bfloat16 and moved.wo_t.shape == (TINY.L, TINY.H * TINY.D,
                                                                       TINY.d)


def test_greedy_tokens_equal_over_32_steps():
    prog = mk.plan(TINY, batch=2, num_sms=8, policy="dag")
    w = mk.Weights.random(TINY, seed=3, dtype=torch.float32, device="cpu")
    prompt = torch.randint(0, TINY.V, (2, 4), generator=torch.Generator().manual_seed(3))
    ref = mk.ReferenceModel(TINY, w, batch=2, max_seq=40, dtype=torch.float32)
    cpu = CpuInterpreter(TINY, w, prog, max_seq=40)
    ids = cpu.generate(prompt, max_new_tokens=29)       # 4 + 28 = 32 steps
    assert cpu.position == 32
    assert torch.equal(ids, ref.generate(prompt, max_new_tokens=29))


def test_counters_monotonic_and_interleavings_legal():
    prog = staged_program(TINY, batch=2, num_sms=4)
    w = mk.Weights.random(TINY, seed=0, dtype=torch.float32, device="cpu")
    cpu = CpuInterpreter(TINY, w, prog, max_seq=16, seed=5)
    targets = torch.from_numpy(prog.counter_targets)
    traces = []
    for epoch in range(1, 5):
        cpu.step(torch.zeros(2, dtype=torch.int64))
        assert int(cpu.buffers.epoch) == epoch and int(cpu.buffers.done) == 4 * epoch
        assert torch.equal(cpu.buffers.counters, targets * epoch)
        traces.append(cpu.trace)
        for sm in range(prog.num_sms):                  # each SM runs its queue in order
            assert [u for s, u in cpu.trace if s == sm] == [
                int(r[2]) for r in prog.instructions[sm, :prog.queue_len[sm]]]
    assert len({tuple(t) for t in traces}) > 1, "the seed should vary the interleaving"
    cpu.reset()
    assert int(cpu.buffers.epoch) == 0 and not cpu.buffers.counters.any()


@pytest.mark.parametrize("policy", ["rr", "dag"])
def test_claimed_tail_matches_reference(policy):
    """claim_tail: the LM head and argmax claimed at run time, several LMHEADs per SM."""
    for seed, batch in ((0, 1), (1, 2)):
        prog = mk.plan(TINY, batch=batch, num_sms=4, policy=policy, claim_tail="lmhead",
                       lmhead_slices=12)
        assert prog.claim_len == 13
        assert compare(TINY, prog, steps=4, seed=seed) <= REL_TOL


def test_claims_follow_the_interleaving():
    """Each step claims differently; what the SMs ran (trace) is Program.as_executed of the
    step's claim record, which validates."""
    prog = mk.plan(TINY, batch=2, num_sms=4, policy="queue")
    w = mk.Weights.random(TINY, seed=0, dtype=torch.float32, device="cpu")
    cpu = CpuInterpreter(TINY, w, prog, max_seq=8, seed=3)
    maps = set()
    for _ in range(3):
        cpu.step(torch.tensor([1, 2]))
        assert cpu.claimed.shape == (4, prog.num_instructions)
        ran = prog.as_executed(cpu.claimed)
        mk.scheduler.validate(ran)
        for sm in range(4):
            assert [u for s, u in cpu.trace if s == sm] == [
                int(r[2]) for r in ran.instructions[sm, :ran.queue_len[sm]]]
        assert (ran.queue_len > 0).all()
        maps.add(cpu.claimed.tobytes())
    assert len(maps) > 1, "the seed should vary who claims what"


def test_counters_wrap_around_int32():
    prog = staged_program(TINY, batch=1)
    w = mk.Weights.random(TINY, seed=0, dtype=torch.float32, device="cpu")
    cpu = CpuInterpreter(TINY, w, prog, max_seq=8)
    ref = mk.ReferenceModel(TINY, w, batch=1, max_seq=8, dtype=torch.float32)
    epoch = 2 ** 31 // int(prog.counter_targets.max())  # target * (epoch + 1) wraps
    cpu.buffers.epoch.fill_(epoch)
    cpu.buffers.done.fill_(prog.num_sms * epoch)
    wrapped = (prog.counter_targets.astype(np.int64) * epoch + 2 ** 31) % 2 ** 32 - 2 ** 31
    cpu.buffers.counters.copy_(torch.from_numpy(wrapped.astype(np.int32)))
    for t in range(3):
        tokens = torch.tensor([t + 1])
        assert rel_err(cpu.step(tokens), ref.step(tokens)) <= REL_TOL


def test_unsatisfiable_wait_reports_deadlock():
    prog = staged_program(TINY, batch=1, num_sms=2)
    last = prog.num_counters - 1                        # ARGMAX's counter: needs every stage
    prog.instructions[1, 0, isa.word_index(Op.EMBED, "wait0_first")] = last
    prog.instructions[1, 0, isa.word_index(Op.EMBED, "wait0_count")] = 1
    w = mk.Weights.random(TINY, seed=0, dtype=torch.float32, device="cpu")
    cpu = CpuInterpreter(TINY, w, prog, max_seq=8)
    with pytest.raises(RuntimeError, match=rf"SM 1 queue index 0 uid 1 opcode EMBED waits on "
                                           rf"counter {last}: value 0, needs 1") as report:
        cpu.step(torch.tensor([0]))
    code, sm, index, uid, counter, value, needed, op = cpu.buffers.error.tolist()
    assert code == 1 and (f"SM {sm} queue index {index} uid {uid} opcode {Op(op).name} waits "
                          f"on counter {counter}: value {value}, needs {needed}") in str(report.value)


def test_blocked_claim_reports_deadlock():
    """The first LM head slice waits on its own counter: it blocks its SM, then ARGMAX the
    other SM; the report names the claimed record's queue index and claim index."""
    prog = mk.plan(TINY, batch=1, num_sms=2, claim_tail="lmhead")
    lm = int(prog.claim[0, isa.word_index(Op.LMHEAD, "signal")])
    prog.claim[0, isa.word_index(Op.LMHEAD, "wait0_first")] = lm
    prog.claim[0, isa.word_index(Op.LMHEAD, "wait0_count")] = 1
    w = mk.Weights.random(TINY, seed=0, dtype=torch.float32, device="cpu")
    cpu = CpuInterpreter(TINY, w, prog, max_seq=8)
    uid = int(prog.claim[0, 2])
    with pytest.raises(RuntimeError, match=rf"queue index \d+ \(claim index 0\) uid {uid} "
                                           rf"opcode LMHEAD waits on counter {lm}: value "
                                           rf"{prog.lm_slices - 1}, needs {prog.lm_slices}"):
        cpu.step(torch.tensor([0]))
    code, sm, index, *_ = cpu.buffers.error.tolist()
    assert code == 1 and index >= prog.queue_len[sm]


def test_bad_inputs_raise_and_write_nothing():
    prog = staged_program(TINY, batch=2)
    w = mk.Weights.random(TINY, seed=0, dtype=torch.float32, device="cpu")
    cpu = CpuInterpreter(TINY, w, prog, max_seq=2)
    bad = [[1, 2], torch.tensor([1, 2], dtype=torch.int32), torch.tensor([1, 2, 3]),
           torch.tensor([[1, 2]]), torch.tensor([0, TINY.V]), torch.tensor([-1, 0])]
    for tokens in bad:
        with pytest.raises(ValueError):
            cpu.step(tokens)
    assert cpu.position == 0 and (cpu.buffers.tokens == INT_POISON).all()
    assert not cpu.buffers.counters.any()
    for _ in range(2):
        cpu.step(torch.tensor([1, 2]))
    with pytest.raises(ValueError, match="positions are used"):
        cpu.step(torch.tensor([1, 2]))
    with pytest.raises(ValueError, match="max_seq"):
        cpu.generate(torch.zeros(2, 2, dtype=torch.long), max_new_tokens=2)
    with pytest.raises(ValueError):
        CpuInterpreter(TINY, w, staged_program(mk.ModelConfig.preset("tiny").replace(
            name="other", num_layers=1), batch=2))


def test_demo_passes_and_fails_on_a_planted_fault(monkeypatch, capsys):
    parser = argparse.ArgumentParser()
    demo.add_arguments(parser)
    args = parser.parse_args(["--steps", "3"])
    assert demo.main(args) == 0
    assert capsys.readouterr().out.count(" ok") == len(demo.POLICIES) == 4
    monkeypatch.setitem(ops_ref.OPS, Op.ARGMAX, lambda rec, w, buf, prog: buf.out_tokens.zero_())
    assert demo.main(parser.parse_args(["--steps", "3", "--policy", "dag"])) == 1
    assert "FAIL" in capsys.readouterr().out
