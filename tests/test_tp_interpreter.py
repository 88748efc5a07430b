"""CpuInterpreter simulating N GPUs (plan(..., tp=N)) against the single-GPU fp32
ReferenceModel: every policy and several interleavings of all ranks' queues, tp = 2, 4, 8,
random valid configs, greedy tokens, monotonic counters on every rank, peer-store
semantics, and bad tp values."""
import random

import pytest
import torch

import megakernel as mk
from megakernel.cpu_interpreter import CpuInterpreter
from megakernel.packing import pack_weights
from megakernel.scheduler.isa import Op

REL_TOL = 1e-5
WIDE = mk.ModelConfig("wide", vocab_size=203, hidden_size=96, intermediate_size=64,
                      num_layers=2, num_heads=16, num_kv_heads=8, head_dim=16,
                      rope_scaling=mk.RopeScaling(8.0, 1.0, 4.0, 32))

from test_cpu_interpreter import compare  # the same oracle comparison, over N ranks

pytestmark = pytest.mark.usefixtures("one_thread")



@pytest.mark.parametrize("fold", [True, False])
@pytest.mark.parametrize("tp", [2, 4, 8])
@pytest.mark.parametrize("policy", ["rr", "lpt", "dag"])
def test_wide_matches_reference(tp, policy, fold):
    """fold: the residual's readers sum the partials, or RESID_SUM stages do (lowering.py)."""
    for seed, batch, granularity in ((0, 1, "chunk"), (1, 3, "head"), (2, 2, "layer")):
        prog = mk.plan(WIDE, batch=batch, num_sms=5, policy=policy, tp=tp,
                       granularity=granularity, fold=fold)
        assert any(r["op"] == Op.RESID_SUM for _, _, r in prog.ranks[0].records()) != fold
        assert compare(WIDE, prog, steps=3, seed=seed) <= REL_TOL


@pytest.mark.parametrize("tp", [2, 4, 8])
def test_fused_reduce_matches_reference(tp):
    """plan(fuse_reduce=True) under tp: each rank's ATTN splits merge their own groups."""
    for seed, batch, granularity in ((0, 1, "chunk"), (1, 3, "layer")):
        prog = mk.plan(WIDE, batch=batch, num_sms=5, tp=tp, granularity=granularity,
                       attn_splits=3, fuse_reduce=True)
        assert not any(r["op"] == Op.ATTN_REDUCE for _, _, r in prog.ranks[0].records())
        assert compare(WIDE, prog, steps=3, seed=seed) <= REL_TOL
        assert compare(WIDE, prog, steps=2, seed=seed, comm="nccl") <= REL_TOL


@pytest.mark.parametrize("fold", [True, False])
@pytest.mark.parametrize("tp", [2, 4])
@pytest.mark.parametrize("policy", ["rr", "dag"])
def test_nccl_between_phases_matches_reference(tp, policy, fold):
    """The NCCL-between-launches ablation: 2L + 2 phase Programs per rank, all-rank traffic
    kept local, the collectives simulated between phases."""
    for seed, batch, granularity in ((0, 1, "chunk"), (1, 3, "head")):
        prog = mk.plan(WIDE, batch=batch, num_sms=5, policy=policy, tp=tp,
                       granularity=granularity, fold=fold)
        assert compare(WIDE, prog, steps=3, seed=seed, comm="nccl") <= REL_TOL


def test_phase_split_rejects_a_wait_on_its_own_phase():
    from megakernel.scheduler.isa import word_index
    from megakernel.scheduler.phases import num_phases, split_phases
    prog = mk.plan(WIDE, batch=1, num_sms=3, tp=2, fold=False)
    phases = split_phases(prog)
    assert len(phases) == 2 and len(phases[0]) == num_phases(WIDE.L)
    assert sum(p.num_instructions for p in phases[1]) == prog.ranks[1].num_instructions
    # Move a RESID_SUM into the phase of the partials it sums: it would wait on NCCL data.
    p = prog.ranks[0]
    sm, i = next((sm, i) for sm, i, r in p.records() if r["op"] == Op.RESID_SUM)
    # Turn it into a layer-0 OPROJ: phase 0, where the all-rank counter it waits on is signalled.
    p.instructions[sm, i, word_index(Op.RESID_SUM, "layer")] = 0
    p.instructions[sm, i, word_index(Op.RESID_SUM, "opcode")] = int(Op.OPROJ)
    with pytest.raises(ValueError, match="waits on counter"):
        split_phases(prog)


@pytest.mark.parametrize("draw", range(4))
def test_random_configs_match_reference(draw):
    rng = random.Random(f"tp-{draw}")
    tp = rng.choice([2, 4, 8])
    Hkv, G, D = tp * rng.choice([1, 2]), rng.choice([1, 2, 4]), rng.choice([16, 32])
    cfg = mk.ModelConfig(
        f"rand-tp{tp}", vocab_size=rng.randrange(40, 200), hidden_size=32 * rng.choice([1, 3, 5]),
        intermediate_size=tp * 2 * rng.randrange(2, 20), num_layers=rng.choice([1, 2]),
        num_heads=G * Hkv, num_kv_heads=Hkv, head_dim=D, tie_word_embeddings=rng.random() < .5,
        rope_theta=rng.choice([10000.0, 500000.0]))
    prog = mk.plan(cfg, batch=rng.randint(1, 4), num_sms=rng.choice([3, 7]), tp=tp,
                   policy=rng.choice(["rr", "lpt", "dag"]),
                   granularity=rng.choice(["layer", "head", "chunk"]),
                   attn_splits=rng.choice([None, 1, 3]))
    assert compare(cfg, prog, steps=3, seed=draw) <= REL_TOL, (cfg, prog.policy)


def test_greedy_tokens_and_monotonic_counters_on_every_rank():
    prog = mk.plan(WIDE, batch=2, num_sms=4, policy="dag", tp=4)
    w = mk.Weights.random(WIDE, seed=3, dtype=torch.float32, device="cpu")
    prompt = torch.randint(0, WIDE.V, (2, 3), generator=torch.Generator().manual_seed(3))
    ref = mk.ReferenceModel(WIDE, w, batch=2, max_seq=16, dtype=torch.float32)
    cpu = CpuInterpreter(WIDE, w, prog, max_seq=16, seed=7)
    assert torch.equal(cpu.generate(prompt, max_new_tokens=8), ref.generate(prompt, 8))
    targets = torch.from_numpy(prog.counter_targets)
    for buf in cpu.rank_buffers:
        assert int(buf.epoch[0]) == cpu.position == 10
        assert torch.equal(buf.counters, targets * 10)
    ranks = {r for r, _, _ in cpu.trace}
    assert ranks == set(range(4)) and len(cpu.trace) == sum(p.num_instructions for p in prog.ranks)


def test_peer_stores_reach_every_rank():
    prog = mk.plan(WIDE, batch=1, num_sms=3, tp=2)
    w = mk.Weights.random(WIDE, seed=0, dtype=torch.float32, device="cpu")
    cpu = CpuInterpreter(WIDE, w, prog, max_seq=8)
    cpu.step(torch.tensor([5]))
    a, b = cpu.rank_buffers
    assert torch.equal(a.part, b.part) and not a.part.isnan().any()
    assert torch.equal(a.resid, b.resid) and not torch.equal(a.act, b.act)
    assert a.q.shape[2] == WIDE.H // 2 and a.logits.shape[1] == WIDE.V


def test_weight_shards_cover_the_model():
    w = mk.Weights.random(WIDE, seed=0, dtype=torch.float32, device="cpu")
    full = pack_weights(w)
    shards = [pack_weights(w, tp=4, rank=r) for r in range(4)]
    assert torch.equal(torch.cat([s.wqkv for s in shards], 1), full.wqkv)
    assert torch.equal(torch.cat([s.wo for s in shards], 2), full.wo)
    assert torch.equal(torch.cat([s.wgu for s in shards], 1), full.wgu)
    assert torch.equal(torch.cat([s.wdown for s in shards], 2), full.wdown)
    assert torch.equal(torch.cat([s.lm_head for s in shards]), full.lm_head)
    assert [s.vocab0 for s in shards] == [0, 50, 101, 152]
    with pytest.raises(ValueError, match="rank"):
        pack_weights(w, tp=4, rank=4)


@pytest.mark.parametrize("tp, what", [(3, "num_kv_heads"), (16, "num_kv_heads")])
def test_bad_tp_raises(tp, what):
    with pytest.raises(ValueError, match=f"tp={tp} must divide {what}"):
        mk.plan(WIDE, tp=tp)
    with pytest.raises(ValueError, match="intermediate_size"):
        mk.plan(WIDE.replace(intermediate_size=66), tp=4)


def test_missing_peer_signal_is_a_deadlock_naming_the_rank():
    prog = mk.plan(WIDE, batch=1, num_sms=3, tp=2, validate=False)
    t = prog.ranks[0].table()
    c = int(t.signal[t.op == Op.DOWN][0])                  # DOWN's all-rank counter
    for p in prog.ranks:
        p.counter_targets[c] += 1                         # a signal no rank sends
    w = mk.Weights.random(WIDE, seed=0, dtype=torch.float32, device="cpu")
    cpu = CpuInterpreter(WIDE, w, prog, max_seq=8)
    with pytest.raises(RuntimeError, match=f"(?s)deadlock.*rank [01] SM .*RESID_SUM waits on "
                                           f"counter {c}"):
        cpu.step(torch.tensor([1]))
    assert any(int(b.error[0]) == 1 for b in cpu.rank_buffers)


def test_more_folding_readers_than_ranges_matches_reference():
    """tiny (d = 128) on 66 SMs a rank: more GATEUP readers than 4-column ranges, so some
    fold ranges are empty (the validator must not count an empty range as a write)."""
    cfg = mk.ModelConfig.preset("tiny")
    prog = mk.plan(cfg, batch=2, num_sms=66, tp=2)
    k = mk.scheduler.isa.word_index(Op.GATEUP, "sum_ncols")
    t = prog.ranks[0].instructions
    assert ((t[..., 0] == Op.GATEUP) & (t[..., k] == 0)).any()
    assert compare(cfg, prog, steps=2) <= REL_TOL
