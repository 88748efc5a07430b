"""Claimed records (Program.claim): the global work queue of policy "queue" and plan option
claim_tail. Planning (dag's order, the tail's uids last), the validator's claim rules with
planted faults, the simulator's rule (the SM free first takes the next claim), as_executed
and the trace tools' refusal of a program with claims. The CPU interpreter's claims are
tested in test_cpu_interpreter.py."""
import argparse
import copy

import numpy as np
import pytest

from megakernel.scheduler import Op, isa, plan, simulate, validate
from megakernel.scheduler.calibration import measure
from megakernel.scheduler.plan import CLAIM_TAILS, parse_options
from megakernel.scheduler.table import CLAIMED

TAIL = {int(Op.LMHEAD), int(Op.ARGMAX)}
UID = isa.HEADER.index("uid")


@pytest.fixture(scope="module")
def queue():
    return plan("tiny", batch=2, num_sms=5, policy="queue")


@pytest.fixture(scope="module")
def tail():
    """dag with the tail claimed, several LMHEADs per SM."""
    return plan("tiny", batch=2, num_sms=5, claim_tail="lmhead", lmhead_slices=15)


def round_robin(prog) -> np.ndarray:
    """A claimed map: claim k to SM k % num_sms, -1 after each SM's last."""
    S, n = prog.num_sms, prog.claim_len
    claimed = np.full((S, n), -1, np.int32)
    for s in range(S):
        mine = np.arange(s, n, S)
        claimed[s, :len(mine)] = mine
    return claimed


def test_queue_claims_every_instruction_in_dag_order(queue):
    validate(queue)
    assert queue.policy == "queue" and queue.options["claim_tail"] == "none"
    assert queue.instructions.shape == (5, 1, isa.WORDS) and not queue.instructions.any()
    assert not queue.queue_len.any() and queue.queue_len.dtype == np.int32
    assert queue.claim_len == queue.num_instructions and queue.claim.dtype == np.int32
    assert queue.claim[:, UID].tolist() == list(range(queue.num_instructions))
    dag = plan("tiny", batch=2, num_sms=5, policy="dag")
    t = dag.table()
    by_uid = dag.instructions[t.sm, t.index][np.argsort(t.uid)]
    np.testing.assert_array_equal(queue.claim, by_uid)        # dag's records, in its order
    table = queue.table()
    assert (table.sm == CLAIMED).all() and table.index.tolist() == list(range(len(table)))
    assert f"claim list {queue.num_instructions}" in queue.summary()
    # the tail option changes nothing when everything is claimed
    np.testing.assert_array_equal(
        plan("tiny", batch=2, num_sms=5, policy="queue", claim_tail="lmhead").claim, queue.claim)


@pytest.mark.parametrize("policy", ["rr", "lpt", "dag"])
def test_claim_tail_claims_lmhead_and_argmax_as_the_last_uids(policy):
    base = plan("tiny", batch=2, num_sms=5, policy=policy)
    prog = plan("tiny", batch=2, num_sms=5, policy=policy, claim_tail="lmhead")
    N, n = prog.num_instructions, prog.claim_len
    assert N == base.num_instructions and n == prog.lm_slices + 1
    assert set(prog.claim[:, 0].tolist()) == TAIL and prog.claim[-1, 0] == Op.ARGMAX
    assert prog.claim[:, UID].tolist() == list(range(N - n, N))
    static = prog.table()
    static = static.take(np.flatnonzero(static.sm != CLAIMED))
    assert not np.isin(static.op, list(TAIL)).any() and len(static) == N - n
    # the other instructions keep their SM, queue position and uid
    t = base.table()
    kept = ~np.isin(t.op, list(TAIL))
    np.testing.assert_array_equal(prog.instructions[static.sm, static.index],
                                  base.instructions[t.sm[kept], t.index[kept]])


def test_claim_tail_that_a_static_instruction_waits_on_is_refused(monkeypatch):
    """Claiming DOWN: the next layer's QKV and the LM head wait on it but stay queued."""
    monkeypatch.setitem(CLAIM_TAILS, "lmhead", (Op.DOWN,))
    with pytest.raises(ValueError, match=r"cannot claim \d+ instructions at run time after "
                       r"the static queues: \w+ \(layer -?\d\) is not claimed but waits on a "
                       "counter a claimed instruction signals"):
        plan("tiny", batch=2, num_sms=5, claim_tail="lmhead")


@pytest.mark.parametrize("kw", [dict(policy="queue"), dict(claim_tail="lmhead")])
def test_claims_need_tp_1(kw):
    with pytest.raises(ValueError, match=r"policy='queue' and claim_tail need tp=1.*tp=2"):
        plan("tiny", num_sms=4, tp=2, **kw)


def test_claim_tail_option_parses_and_checks():
    assert parse_options("policy=queue,claim_tail=lmhead") == dict(policy="queue",
                                                                  claim_tail="lmhead")
    with pytest.raises(ValueError, match=r"claim_tail must be one of \['none', 'lmhead'\]"):
        plan("tiny", claim_tail="argmax")
    assert plan("tiny", num_sms=4).options["claim_tail"] == "none"


def caught(prog, match):
    with pytest.raises(ValueError, match=match):
        validate(prog)


def test_validator_rejects_bad_claims(tail):
    validate(tail)
    N, n = tail.num_instructions, tail.claim_len
    p = copy.deepcopy(tail)      # a claimed uid below a static one: swap with uid 0's
    sm, k = np.argwhere((p.instructions[:, :, UID] == 0) & (p.instructions[:, :, 0] != 0))[0]
    p.instructions[sm, k, UID], p.claim[0, UID] = p.claim[0, UID], 0
    caught(p, r"uid 0 LMHEAD \(layer -1\) at claim index 0: claimed uid 0 is smaller than a "
              rf"static uid \({N - n} static instructions")
    p = copy.deepcopy(tail)      # two LMHEADs swapped: the claim list out of uid order
    p.claim[[0, 1]] = p.claim[[1, 0]]
    caught(p, rf"at claim index 0: claim index 0 must hold uid {N - n}: claims must be in "
              "uid order")
    p = copy.deepcopy(tail)
    p.claim[1, UID] = p.claim[0, UID]
    caught(p, r"uids must be 0\.\.\d+, each once")
    p = copy.deepcopy(tail)      # ARGMAX before the LM head it reads: the counter order
    p.claim[[0, -1]] = p.claim[[-1, 0]]
    p.claim[[0, -1], UID] = p.claim[[-1, 0], UID]
    caught(p, r"ARGMAX \(layer -1\) at claim index 0: waits on counter \d+, signalled by "
              r"uid \d+ LMHEAD \(layer -1\) at claim index \d+, which is not earlier")
    p = copy.deepcopy(tail)
    p.claim[2, 0] = Op.NOP
    caught(p, "claim index 2 is a NOP")
    p = copy.deepcopy(tail)
    p.claim = p.claim[:-1]
    caught(p, r"num_instructions \d+ .* claim_len")
    p = copy.deepcopy(tail)
    p.claim = p.claim.astype(np.int64)
    caught(p, "claim must be int32")


def test_validator_rejects_claims_under_tp():
    prog = plan("tiny", num_sms=4, tp=2)
    validate(prog)
    rank = prog.ranks[1]
    rank.claim = rank.instructions[0, :1].copy()
    rank.num_instructions += 1
    caught(prog, "rank 1 has 1 claimed records: claims need tp = 1")


def simulated_claims(prog, tl) -> np.ndarray:
    """The claimed map of the simulator's timeline `tl` of prog: who it predicts claims what."""
    on = tl.sm[tl.uid >= prog.num_instructions - prog.claim_len]   # claim order
    claimed = np.full((prog.num_sms, prog.claim_len), -1, np.int32)
    for s in range(prog.num_sms):
        mine = np.flatnonzero(on == s)
        claimed[s, :len(mine)] = mine
    return claimed


def replay(prog, spec):
    """The simulator's rule, independently: uid order; a claim to the SM free first."""
    t = prog.table()
    t = t.take(np.argsort(t.uid))
    from megakernel.scheduler.cost import instruction_us
    cost = instruction_us(t, prog.config, prog.batch, prog.attn_splits, prog.lm_slices, spec,
                          prog.num_sms, prog.options["kv_position"])
    free, done = [0.0] * prog.num_sms, {}
    sm, start = [], []
    for i in range(len(t)):
        s = int(t.sm[i]) if t.sm[i] != CLAIMED else min(range(prog.num_sms),
                                                        key=lambda k: (free[k], k))
        ready = max([max(done.get(c, 0.0) for c in range(f, f + m)) + spec.counter_latency_us
                     for f, m in t.wait_ranges(i)], default=0.0)
        sm.append(s)
        start.append(max(free[s], ready))
        free[s] = start[-1] + cost[i]
        if t.signal[i] >= 0:
            done[int(t.signal[i])] = max(done.get(int(t.signal[i]), 0.0), free[s])
    return np.array(sm), np.array(start)


@pytest.mark.parametrize("which", ["queue", "tail"])
def test_simulate_gives_each_claim_to_the_first_free_sm(which, request):
    prog = request.getfixturevalue(which)
    tl = simulate(prog)
    sm, start = replay(prog, prog.gpu)
    np.testing.assert_array_equal(tl.sm, sm)
    np.testing.assert_allclose(tl.start_us, start)
    assert np.isfinite(prog.predicted_us) and tl.total_us == pytest.approx(prog.predicted_us)
    claimed = tl.uid >= prog.num_instructions - prog.claim_len
    assert len(set(tl.sm[claimed].tolist())) == prog.num_sms     # spread over every SM
    # the queues the simulator predicts, run as static queues, replay the same timeline
    ex = simulate(prog.as_executed(simulated_claims(prog, tl)))
    np.testing.assert_array_equal(ex.sm, tl.sm)
    np.testing.assert_allclose(ex.end_us, tl.end_us)


@pytest.mark.parametrize("which", ["queue", "tail"])
def test_as_executed_appends_each_sms_claims_to_its_queue(which, request):
    prog = request.getfixturevalue(which)
    claimed = round_robin(prog)
    ex = prog.as_executed(claimed)
    validate(ex)
    assert ex.claim_len == 0 and ex.num_instructions == prog.num_instructions
    t = ex.table()
    assert sorted(t.uid.tolist()) == list(range(prog.num_instructions))
    for s in range(prog.num_sms):
        q = ex.instructions[s, :ex.queue_len[s]]
        static = prog.instructions[s, :prog.queue_len[s]]
        np.testing.assert_array_equal(q, np.concatenate([static, prog.claim[s::prog.num_sms]]))
    assert not ex.instructions[np.arange(ex.max_len)[None] >= ex.queue_len[:, None]].any()


def test_as_executed_rejects_impossible_claim_maps(tail):
    good = round_robin(tail)
    bad_shape = good[:, :-1]
    with pytest.raises(ValueError, match=r"claimed must be integers \[num_sms=5, claim_len="):
        tail.as_executed(bad_shape)
    for s, j, v, match in ((0, 1, 0, r"claimed\[0, 1\] = 0: .*increasing"),
                           (1, 0, -1, r"claimed\[1, 1\] = 6: .*then -1"),
                           (2, 0, tail.claim_len, r"claimed\[2, 0\] = \d+: each row must be"),
                           (0, 0, -5, r"claimed\[0, 0\] = -5")):
        claimed = good.copy()
        claimed[s, j] = v
        with pytest.raises(ValueError, match=match):
            tail.as_executed(claimed)
    claimed = good.copy()
    claimed[1, 0] = 0           # claim 0 on SMs 0 and 1, claim 1 on none
    with pytest.raises(ValueError, match="every claim index 0..15 exactly once"):
        tail.as_executed(claimed)


def test_a_claimed_step_is_measured_through_as_executed(queue):
    """The kernel stamps a claimed record at its SM's queue length + the claims it took
    before, in rows max_len + claim_len long: as_executed's (SM, queue index)."""
    tl = simulate(queue)
    ran = queue.as_executed(simulated_claims(queue, tl))
    t = ran.table()
    timing = np.zeros((queue.num_sms, queue.max_len + queue.claim_len, 3), np.int64)
    us = np.stack([tl.start_us[t.uid], tl.start_us[t.uid], tl.end_us[t.uid]], 1)
    timing[t.sm, t.index] = np.round(us * 1e3).astype(np.int64) + 10 ** 9
    m = measure(ran, timing)
    np.testing.assert_allclose(m.compute_us, (tl.end_us - tl.start_us)[t.uid], atol=2e-3)
    assert m.span_us == pytest.approx(tl.total_us, abs=2e-3)
    with pytest.raises(ValueError, match=rf"the program needs \[5, >= {ran.max_len}, 3 or 4\]"):
        measure(ran, timing[:, :ran.max_len - 1])


def test_trace_tools_refuse_a_program_with_claims(tail):
    timing = np.zeros((tail.num_sms, tail.max_len + tail.claim_len, 4), np.int64)
    with pytest.raises(ValueError, match=r"calibration.measure needs each SM's queue.*"
                                         r"as_executed\(claimed\)"):
        measure(tail, timing)
    from megakernel.bench import trace
    with pytest.raises(ValueError, match=r"trace.release_line needs each SM's queue"):
        trace.release_line(tail, timing)


def test_dump_shows_the_claim_list(capsys):
    from megakernel.scheduler import dump
    parser = argparse.ArgumentParser()
    dump.add_arguments(parser)
    assert dump.main(parser.parse_args(["--model", "tiny", "--batch", "2", "--num-sms", "5",
                                        "--claim-tail", "lmhead"])) == 0
    out = capsys.readouterr().out
    assert "claim list 6" in out and "claim list: 6 records claimed at run time" in out
    assert "LMHEAD 5, ARGMAX 1" in out and "predicted claims per SM" in out
    assert dump.main(parser.parse_args(["--model", "tiny", "--num-sms", "4", "--tp", "2",
                                        "--policy", "queue"])) == 2
    assert "need tp=1" in capsys.readouterr().err


@pytest.mark.parametrize("which", ["queue", "tail"])
def test_kept_trace_recovers_its_claims(which, request):
    """trace --from-npz re-plans a claimed program and reads the claim map back out of the
    queues kept as executed (trace_cli._claims_of): the same map, so the same queues."""
    from megakernel.trace_cli import _claims_of
    prog = request.getfixturevalue(which)
    claimed = round_robin(prog)
    kept = prog.as_executed(claimed)
    back = _claims_of(prog, kept.instructions, kept.queue_len)
    assert np.array_equal(back, claimed)
    again = prog.as_executed(back)
    assert np.array_equal(again.instructions, kept.instructions)
