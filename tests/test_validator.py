"""The validator: faults planted in valid plans are caught, with a message that names the
instruction (uid, opcode, SM, queue index) and the counter or buffer element."""
import copy
import re

import numpy as np
import pytest

from megakernel.config import ModelConfig
from megakernel.scheduler import Op, isa, plan, validate
from megakernel.scheduler import dataflow, happens
from megakernel.scheduler.access import BUFFERS, accesses

WHERE = r"uid \d+ {op} \(layer -?\d+\) on SM \d+ at queue index \d+"


@pytest.fixture(scope="module")
def base():
    """The plan with every stage (ATTN_REDUCE, OPROJ: not the default at batch 2)."""
    return plan("tiny", batch=2, num_sms=6, granularity="chunk", fuse_oproj=False)


def find(prog, op, nth=0, **fields):
    """(sm, index) of the nth instruction (uid order) with opcode op and these fields."""
    hits = sorted((r["uid"], sm, k) for sm, k, r in prog.records()
                  if r["op"] == op and all(r[f] == v for f, v in fields.items()))
    return hits[nth][1:]


def put(prog, at, field, value):
    sm, k = at
    prog.instructions[sm, k, isa.word_index(Op(prog.instructions[sm, k, 0]), field)] = value


def remove(prog, at):
    """Drop one instruction, keeping uids 0..N-1 and counter targets consistent."""
    sm, k = at
    rec = isa.decode(prog.instructions[sm, k])
    n = prog.queue_len[sm]
    prog.instructions[sm, k:n - 1] = prog.instructions[sm, k + 1:n].copy()
    prog.instructions[sm, n - 1] = 0
    prog.queue_len[sm] -= 1
    prog.num_instructions -= 1
    uid = prog.instructions[:, :, 2]
    uid[(uid > rec["uid"]) & (prog.instructions[:, :, 0] != 0)] -= 1
    if rec["signal"] >= 0:
        prog.counter_targets[rec["signal"]] -= 1


def caught(prog, match):
    with pytest.raises(ValueError, match=match) as e:
        validate(prog)
    return str(e.value)


def test_valid_plans_pass(base):
    validate(base)
    for policy in ("rr", "lpt", "dag"):
        validate(plan("llama-3.2-1b", batch=4, policy=policy, granularity="head", validate=False))


def test_missing_dependency_is_caught(base):
    p = copy.deepcopy(base)
    at = find(p, Op.ATTN, nth=3)
    put(p, at, "wait0_count", 0)
    put(p, at, "wait0_first", 0)
    msg = caught(p, "does not happen before it")
    assert re.search(WHERE.format(op="ATTN"), msg)
    assert "counter" in msg and "QKV" in msg


def test_partial_dependency_is_caught(base):
    """ATTN waits on all but the last QKV slice of its group (chunk counters)."""
    p = copy.deepcopy(base)
    at = find(p, Op.ATTN, kv_head=1)
    sm, k = at
    assert isa.decode(p.instructions[sm, k])["wait0_count"] > 1
    p.instructions[sm, k, isa.word_index(Op.ATTN, "wait0_count")] -= 1
    caught(p, r"reads (q|k_new|v_new)\[.*does not happen before")


def test_missing_wait_in_the_mlp_is_caught(base):
    p = copy.deepcopy(base)
    put(p, find(p, Op.DOWN, layer=1), "wait0_count", 0)
    put(p, find(p, Op.DOWN, layer=1), "wait0_first", 0)
    # act is read directly; resid[3] only transitively (through GATEUP's wait): both unordered
    caught(p, r"DOWN .* reads (act|resid)\[.*does not happen before")


@pytest.mark.parametrize("delta", [1, -1])
def test_wrong_expected_count_is_caught(base, delta):
    p = copy.deepcopy(base)
    c = int(p.counter_targets.argmax())
    p.counter_targets[c] += delta
    msg = caught(p, f"counter {c}: counter_targets says")
    assert "uid" in msg and "SM" in msg


def test_queue_out_of_topological_order_is_caught(base):
    p = copy.deepcopy(base)
    sm = 2
    p.instructions[sm, [3, 4]] = p.instructions[sm, [4, 3]]
    caught(p, r"follows uid \d+ in SM 2's queue.*can deadlock")


def test_wait_on_a_later_instruction_is_caught():
    """Queues stay sorted (one instruction per SM) but a consumer's uid precedes its producer's."""
    p = plan("tiny", num_sms=200, slices=2, policy="rr", fuse_oproj=False)
    assert p.queue_len.max() == 1
    consumer = find(p, Op.ATTN_REDUCE)
    first = int(p.instructions[consumer][isa.word_index(Op.ATTN_REDUCE, "wait0_first")])
    producer = next((sm, k) for sm, k, r in p.records() if r["signal"] == first)
    u1, u2 = int(p.instructions[consumer][2]), int(p.instructions[producer][2])
    p.instructions[consumer][2], p.instructions[producer][2] = u2, u1
    caught(p, rf"ATTN_REDUCE .*waits on counter {first}, signalled by .*ATTN .*can deadlock")


def test_two_writers_of_one_output_are_caught(base):
    p = copy.deepcopy(base)
    rows = sorted((r["row0"], sm, k) for sm, k, r in p.records()
                  if r["op"] == Op.GATEUP and r["layer"] == 0)
    put(p, rows[1][1:], "row0", rows[0][0])
    caught(p, r"writes act\[layer=0, col=0, b=0\], also written by uid \d+ GATEUP")


def test_duplicate_lm_head_slot_is_caught(base):
    p = copy.deepcopy(base)
    put(p, find(p, Op.LMHEAD, nth=1), "slot", 0)
    caught(p, r"writes amax_(val|idx)\[slot=0, b=0\], also written by")


def test_read_of_something_never_written_is_caught(base):
    p = copy.deepcopy(base)
    remove(p, find(p, Op.OPROJ, layer=1, nth=2))
    caught(p, r"GATEUP .*reads resid\[level=3, col=\d+, b=0\], which no instruction writes")


def test_unwritten_output_is_caught(base):
    p = copy.deepcopy(base)
    remove(p, find(p, Op.LMHEAD, row0=0))
    caught(p, r"reads amax_val\[slot=0|logits\[row=0, b=0\] is never written")


def test_waited_counter_without_signalers_is_caught(base):
    p = copy.deepcopy(base)
    c = int(p.instructions[find(p, Op.ARGMAX)][isa.word_index(Op.ARGMAX, "wait0_first")])
    for sm, k, r in list(p.records()):
        if r["signal"] == c:
            p.instructions[sm, k, 7] = -1
    p.counter_targets[c] = 0
    caught(p, rf"ARGMAX .*waits on counter {c}, which no instruction signals")


@pytest.mark.parametrize("plan, op, field, value, match", [("base", *c) for c in [
    (Op.QKV, "nrows", 3, "multiple of 2"),
    (Op.QKV, "row0", 1, "multiple of 2"),
    (Op.OPROJ, "nrows", 10_000, "at most"),
    (Op.ATTN, "split", 99, "split = 99 outside"),
    (Op.ATTN_REDUCE, "b", 2, "b = 2 outside"),
    (Op.ATTN_REDUCE, "nheads", 0, r"q heads \[.*\) \(head0, nheads\) must lie"),
    (Op.ATTN_REDUCE, "head0", 99, r"q heads \[99, .*must lie"),
    (Op.LMHEAD, "slot", -1, "slot = -1 outside"),
    (Op.GATEUP, "layer", 7, "layer must be"),
    (Op.EMBED, "layer", 0, "layer must be -1"),
    (Op.DOWN, "signal", 10_000, "signal 10000 outside"),
    (Op.OPROJ, "wait0_first", 10_000, "wait ranges"),
]] + [("fused_oproj", *c) for c in [
    (Op.ATTN_OPROJ, "head", 4, r"\(head, dim0, ndims\) = \(4, "),
    (Op.ATTN_OPROJ, "ndims", 0, r"\(head, dim0, ndims\) = \(\d+, \d+, 0\)"),
    (Op.ATTN_OPROJ, "dim0", 31, r"dims \[dim0, dim0 \+ ndims\) a non-empty range"),
    (Op.ATTN_OPROJ, "ndims", 6, r"\(head, dim0, ndims\) = \(\d+, \d+, 6\): .*whole 4-dim"),
    (Op.ATTN_OPROJ, "ncols", 12, r"\(col0, ncols\) = \(\d+, 12\): .*a multiple of 8"),
    (Op.ATTN_OPROJ, "col0", 2, r"\(col0, ncols\) = \(2, \d+\): .*col0 a multiple of 4"),
    (Op.ATTN_OPROJ, "col0", 10_000, r"\(col0, ncols\) = \(10000, \d+\): columns inside"),
    (Op.ATTN_OPROJ, "layer", 2, "layer must be"),
    (Op.EMBED, "copy", 2, "copy = 2"),
]])
def test_bad_fields_are_caught(request, plan, op, field, value, match):
    """plan: the fixture whose program is broken (the unfused plan, or a fuse_oproj one)."""
    p = copy.deepcopy(request.getfixturevalue(plan))
    put(p, find(p, op), field, value)
    caught(p, WHERE.format(op=op.name) + ": .*" + match)


def test_bad_encoding_is_caught(base):
    p = copy.deepcopy(base)
    p.instructions[0, p.queue_len[0], 5] = 1
    caught(p, "not all-zero NOP padding")
    p = copy.deepcopy(base)
    p.instructions[1, 0, 0] = 42
    caught(p, "unknown opcode 42")
    p = copy.deepcopy(base)
    p.instructions[1, 0, 2] = p.instructions[1, 1, 2]
    caught(p, "uids must be")
    p = copy.deepcopy(base)
    at = find(p, Op.EMBED)
    p.instructions[at][isa.WORDS - 2] = 5
    caught(p, "words past the opcode's fields must be 0")
    p = copy.deepcopy(base)
    p.instructions[find(p, Op.OPROJ)][isa.ALL_RANKS_WORD] = 1
    caught(p, "all_ranks = 1, must be 0")
    p = copy.deepcopy(base)
    p.instructions[find(p, Op.ATTN_REDUCE)][len(isa.HEADER) + 4] = 1
    caught(p, "words past the opcode's fields must be 0")
    p = copy.deepcopy(base)
    p.queue_len[0] = p.max_len
    if (p.instructions[0, :, 0] == 0).any():
        caught(p, "NOP inside the queue")
    p = copy.deepcopy(base)
    p.instructions = p.instructions.astype(np.int64)
    caught(p, "must be int32")


@pytest.fixture(scope="module")
def fused():
    return plan("tiny", batch=2, num_sms=6, granularity="chunk", attn_splits=3,
                fuse_reduce=True)


def _ticket(p, **fields):
    sm, k = find(p, Op.ATTN, **fields)
    return isa.decode(p.instructions[sm, k])["ticket"]


def test_fused_reduce_plan_passes(fused):
    validate(fused)
    assert not any(r["op"] == Op.ATTN_REDUCE for _, _, r in fused.records())


def test_splits_swapping_tickets_across_groups_are_caught(fused):
    """Every ticket still taken 3 times, but by splits of two groups: neither would know
    when its own group is complete."""
    p = copy.deepcopy(fused)
    t0, t1 = _ticket(p, b=0, kv_head=0), _ticket(p, b=1, kv_head=0)
    put(p, find(p, Op.ATTN, b=0, kv_head=0, split=1), "ticket", t1)
    put(p, find(p, Op.ATTN, b=1, kv_head=0, split=1), "ticket", t0)
    msg = caught(p, "a group's splits share one")
    assert re.search(WHERE.format(op="ATTN"), msg)


def test_wrong_ticket_target_is_caught(fused):
    p = copy.deepcopy(fused)
    p.counter_targets[_ticket(p, b=0, kv_head=0)] += 1
    caught(p, "take it as a ticket")


def test_split_without_merge_in_a_merging_group_is_caught(fused):
    """Its ticket add is gone: the group would never merge (the target is 3)."""
    p = copy.deepcopy(fused)
    at = find(p, Op.ATTN, b=1, kv_head=0, split=0)
    put(p, at, "merge", 0)
    put(p, at, "ticket", 0)
    caught(p, "take it as a ticket")


def test_ticket_that_is_also_a_signal_or_waited_is_caught(fused):
    p = copy.deepcopy(fused)
    at = find(p, Op.OPROJ)
    sm, k = at
    put(p, at, "signal", _ticket(p, b=0, kv_head=0))
    caught(p, "which instructions also signal")
    p = copy.deepcopy(fused)
    at = find(p, Op.OPROJ)
    put(p, at, "wait1_first", _ticket(p, b=0, kv_head=0))
    put(p, at, "wait1_count", 1)
    caught(p, "which no instruction signals")


def test_bad_merge_field_is_caught(fused):
    p = copy.deepcopy(fused)
    put(p, find(p, Op.ATTN), "merge", 2)
    caught(p, r"\(merge, ticket\) = \(2")


@pytest.fixture(scope="module")
def fused_oproj():
    return plan("tiny", batch=2, num_sms=6, granularity="chunk", attn_splits=3,
                fuse_oproj=True)


def test_fused_oproj_plan_passes(fused_oproj):
    validate(fused_oproj)
    ops = {r["op"] for _, _, r in fused_oproj.records()}
    assert Op.ATTN_OPROJ in ops and not ops & {Op.ATTN_REDUCE, Op.OPROJ}


def _word(p, at, field):
    return int(p.instructions[at][isa.word_index(Op(p.instructions[at][0]), field)])


@pytest.mark.parametrize("op,layer", [(Op.ATTN_OPROJ, 1), (Op.ATTN_OPROJ, 0), (Op.OPROJ, 1)])
def test_residual_ordered_only_through_the_attention_block_is_caught(fused_oproj, base, op,
                                                                      layer):
    """The stage after the attention block waits on the residual's writer itself (its first
    range: the previous DOWN, layer 0 EMBED), since ATTN's waits may be flagged polls that
    carry no order (MK_LL_Q). Without that range the residual is ordered only through
    ATTN, which does not count."""
    p = copy.deepcopy(fused_oproj if op == Op.ATTN_OPROJ else base)
    at = find(p, op, layer=layer)
    assert _word(p, at, "wait0_count") == 1 and _word(p, at, "wait1_count") > 0
    put(p, at, "wait0_first", 0)
    put(p, at, "wait0_count", 0)
    writer = "DOWN" if layer else "EMBED"
    if op == Op.OPROJ:   # its input, resid[2l]
        what = rf"reads resid\[level={2 * layer},.*written by uid \d+ {writer} "
    else:                # the initial value of resid[2l+1], which the previous DOWN copies
        what = (rf"accumulates into resid\[level={2 * layer + 1},.*whose initial value is "
                rf"written by uid \d+ {writer} ")
    caught(p, rf"{op.name} \(layer {layer}\).*: {what}.*does not happen before it")


def test_attn_oproj_not_waiting_on_its_group_is_caught(fused_oproj):
    """Head 0's ATTN_OPROJ waits on kv group 1's ATTN counters (its second range, shifted by
    one): the residual's initial value is still ordered (its first range, the previous
    DOWN's counter), group 0's partials not."""
    p = copy.deepcopy(fused_oproj)
    at = find(p, Op.ATTN_OPROJ, layer=1, head=0)
    put(p, at, "wait1_first", _word(p, at, "wait1_first") + 1)
    msg = caught(p, r"ATTN_OPROJ .*: reads (o_part|lse)\[layer=1, b=0, head=0.*written by uid "
                 r"\d+ ATTN .*does not happen before it")
    assert re.search(WHERE.format(op="ATTN_OPROJ"), msg)


def test_accumulation_without_initial_value_is_caught(fused_oproj):
    p = copy.deepcopy(fused_oproj)
    put(p, find(p, Op.DOWN, layer=0), "copy", 0)
    caught(p, WHERE.format(op="ATTN_OPROJ") + r": accumulates into resid\[level=3, col=\d+, "
           r"b=0\], which no instruction writes")
    p = copy.deepcopy(fused_oproj)
    put(p, find(p, Op.EMBED), "copy", 0)
    caught(p, r"ATTN_OPROJ \(layer 0\).*accumulates into resid\[level=1, col=0, b=0\], "
           "which no instruction writes")


def test_accumulation_before_its_initial_value_is_caught(fused_oproj):
    p = copy.deepcopy(fused_oproj)
    at = find(p, Op.ATTN_OPROJ, layer=1)
    put(p, at, "wait0_first", 0)
    put(p, at, "wait0_count", 0)
    caught(p, r"ATTN_OPROJ .*: accumulates into resid\[level=3, .*whose initial value is "
           r"written by uid \d+ DOWN \(layer 0\).*does not happen before it")


@pytest.mark.parametrize("plan, reader, adder, level", [
    ("fused_oproj", Op.GATEUP, Op.ATTN_OPROJ, 3), ("down_k", Op.QKV, Op.DOWN, 2)])
def test_read_before_the_accumulations_is_caught(request, plan, reader, adder, level):
    """The reader of a residual level waits on what its accumulating writers wait on (GATEUP
    on the ATTN counters, the next layer's QKV on the GATEUP counters), which follow the
    level's initial value, not on the accumulators: it could read before their adds land."""
    p = copy.deepcopy(request.getfixturevalue(plan))
    layer = (level - 1) // 2
    at, acc = find(p, reader, layer=level // 2), find(p, adder, layer=layer)
    for field in ("wait0_first", "wait0_count"):
        put(p, at, field, _word(p, acc, field))
    caught(p, WHERE.format(op=reader.name) + rf": reads resid\[level={level}, col=\d+, b=0\], "
           rf"accumulated into by uid \d+ {adder.name} \(layer {layer}\).*does not happen "
           "before it")


def test_copy_from_the_last_down_is_caught(fused_oproj):
    p = copy.deepcopy(fused_oproj)
    put(p, find(p, Op.DOWN, layer=1), "copy", 1)
    caught(p, WHERE.format(op="DOWN") + r": copy = 1: .*resid has no level 5")


def test_attn_oproj_under_tp_is_caught():
    p = plan("tiny", batch=1, num_sms=4, tp=2)
    rank = p.ranks[1]
    sm, k = find(rank, Op.ATTN_REDUCE)
    rank.instructions[sm, k, 0] = Op.ATTN_OPROJ
    rank.instructions[sm, k, len(isa.HEADER):len(isa.HEADER) + 4] = [0, 0, 1, 0]
    caught(p, r"ATTN_OPROJ .*: ATTN_OPROJ needs tp = 1")


def test_reduce_in_a_fused_oproj_plan_is_caught(fused_oproj):
    """A plan with ATTN_OPROJ has no attn buffer: an ATTN_REDUCE writing it is outside."""
    p = copy.deepcopy(fused_oproj)
    sm, k = find(p, Op.ATTN_OPROJ, layer=1)
    p.instructions[sm, k, 0] = Op.ATTN_REDUCE
    p.instructions[sm, k, len(isa.HEADER):len(isa.HEADER) + 5] = [0, 0, 0, 1, 0]
    caught(p, r"ATTN_REDUCE .*: accesses attn elements .*a plan with ATTN_OPROJ has no attn")


def test_qkv_accesses_match_a_row_by_row_mapping():
    """Validator coordinates of a QKV slice equal the isa.py packed-row semantics."""
    cfg = ModelConfig("g", 100, 192, 64, 2, 8, 2, head_dim=64)       # G = 4
    G, D, R = cfg.G, cfg.D, (cfg.G + 2) * cfg.D
    p = plan(cfg, batch=3, num_sms=4, qkv_slices=7)
    t = p.table()
    acc = accesses(t, cfg, 3, p.attn_splits, p.lm_slices)
    for i in np.flatnonzero(t.op == Op.QKV):
        l, (r0, n) = int(t.layer[i]), t.args[i, :2]
        expect = {"q": set(), "k_new": set(), "v_new": set()}
        for row in range(r0, r0 + n):
            g, o = divmod(row, R)
            for b in range(3):
                lb = l * 3 + b
                if o < G * D:          # q head g*G + o // D, packed dim o % D
                    expect["q"].add((lb * cfg.H + g * G + o // D) * D + o % D)
                else:
                    kind = "k_new" if o < (G + 1) * D else "v_new"
                    expect[kind].add((lb * cfg.Hkv + g) * D + o % D)
        got = {"q": set(), "k_new": set(), "v_new": set()}
        for k in np.flatnonzero((acc.inst == i) & acc.write):
            got[BUFFERS[acc.buf[k]]].update(range(acc.start[k], acc.stop[k]))
        assert got == expect


def test_prefix_bitsets_match_python_sets():
    """Prefix sets and (the flagged hops') frozensets, mixed, against python sets."""
    rng = np.random.default_rng(0)
    for _ in range(200):
        sets, ref = [], []
        for i in range(3):
            xs = rng.choice(200, size=int(rng.integers(0, 120)), replace=False)
            s = happens.EMPTY if i or rng.integers(2) else frozenset()
            for x in xs.tolist():
                s = happens.add(s, x)
            sets.append(s)
            ref.append(set(xs.tolist()))
        u = happens.union(happens.union(sets[0], sets[1]), sets[2])
        want = ref[0] | ref[1] | ref[2]
        assert all(happens.contains(u, x) == (x in want) for x in range(260))
        sets.append(u)
        ref.append(want)
        sig = rng.integers(0, len(sets), 500)
        x = rng.integers(0, 260, 500)
        got = happens.contains_many(sets, sig, x)
        assert got.tolist() == [int(xk) in ref[sk] for sk, xk in zip(sig.tolist(), x.tolist())]


def test_shallow_waiters_pass_on_their_signalers_alone():
    """A chain 0 -> 1 -> 2 -> 3 (instruction u signals counter u and waits on u - 1); 2 is
    shallow (a flagged hop): its ancestors are {1}, not {0, 1}, and 3 then has {1, 2}
    unless it also waits on counter 0 itself."""
    waits = np.array([[0, 0, 0, 0], [0, 1, 0, 0], [1, 1, 0, 0], [2, 1, 0, 0]])
    signal, tracked = np.arange(4), np.ones(4, bool)
    shallow = np.array([False, False, True, False])
    for w3, want in (((2, 1, 0, 0), {1, 2}), ((0, 1, 2, 1), {0, 1, 2})):
        waits[3] = w3
        for flagged, want3 in ((None, {0, 1, 2}), (shallow, want)):
            sig_of, sets, position = happens.ancestor_sets(waits, signal, tracked, flagged)
            got = [{x for x in range(4) if happens.contains(sets[sig_of[u]], position[x])}
                   for u in range(4)]
            assert got == [set(), {0}, {1} if flagged is not None else {0, 1}, want3]


@pytest.fixture(scope="module")
def down_k():
    """K-sliced DOWN (tiny's I = 320: slices of 128 and 192 columns) after OPROJ."""
    return plan("tiny", batch=2, num_sms=6, granularity="chunk", down_k_slices=2,
                fuse_oproj=False)


@pytest.fixture(scope="module")
def fused_down_k():
    """K-sliced DOWN with ATTN_OPROJ: GATEUP copies, DOWN adds into two levels."""
    return plan("tiny", batch=2, num_sms=6, granularity="chunk", down_k_slices=2,
                fuse_oproj=True)


def test_down_k_plan_passes(down_k):
    validate(down_k)
    downs = [r for _, _, r in down_k.records() if r["op"] == Op.DOWN]
    assert {(r["k0"], r["kn"]) for r in downs} == {(0, 128), (128, 192)}
    assert all(r["copy"] == 1 for _, _, r in down_k.records() if r["op"] == Op.OPROJ)


def test_down_k_without_initial_value_is_caught(down_k):
    """No OPROJ copy: the K slices add onto a resid[2l+2] nobody stored."""
    p = copy.deepcopy(down_k)
    put(p, find(p, Op.OPROJ, layer=1, row0=0), "copy", 0)
    caught(p, WHERE.format(op="DOWN") + r": accumulates into resid\[level=4, col=0, b=0\], "
           "which no instruction writes")


def test_down_k_overlapping_slices_are_caught(down_k):
    """Row slice 0 grown by a row (both its K slices): its accumulations overlap slice 1's
    without covering the same range."""
    p = copy.deepcopy(down_k)
    for k0 in (0, 128):
        at = find(p, Op.DOWN, layer=0, row0=0, k0=k0)
        put(p, at, "nrows", _word(p, at, "nrows") + 1)
    caught(p, r"one stage's accumulations must cover identical or disjoint ranges")


def test_fused_down_k_plan_passes(fused_down_k):
    """GATEUP copy 2 (1 on the last layer) over ranges tiling d; every K slice adds into
    resid[2l+3] too except on the last layer; ATTN_OPROJ's column slices and the DOWN row
    slices overlap in resid[2l+3] without being equal."""
    p = fused_down_k
    validate(p)
    recs = [r for _, _, r in p.records()]
    L = p.config.L
    for layer in range(L):
        gate = sorted((r["sum_col0"], r["sum_ncols"], r["copy"]) for r in recs
                      if r["op"] == Op.GATEUP and r["layer"] == layer)
        assert {c for *_, c in gate} == {1 + (layer < L - 1)}
        assert np.cumsum([0] + [n for _, n, _ in gate])[:-1].tolist() == [c for c, *_ in gate]
        assert sum(n for _, n, _ in gate) == p.config.d
        downs = [r for r in recs if r["op"] == Op.DOWN and r["layer"] == layer]
        assert all(r["kn"] > 0 and r["copy"] == int(layer < L - 1) for r in downs)


def test_fused_down_k_without_gateup_copy_is_caught(fused_down_k):
    """One GATEUP of layer 0 copies nothing: its columns of resid[2] (the initial value of
    the DOWN adds, which layer 1's QKV reads) are never written."""
    p = copy.deepcopy(fused_down_k)
    at = find(p, Op.GATEUP, layer=0, sum_col0=0)
    put(p, at, "copy", 0)
    put(p, at, "sum_ncols", 0)
    caught(p, r": (reads|accumulates into) resid\[level=2, col=0, b=0\], which no "
           "instruction writes")


def test_fused_down_k_missing_second_add_is_caught(fused_down_k):
    """A layer-0 K slice that does not also add into resid[3] would leave the next
    ATTN_OPROJ's initial value without it."""
    p = copy.deepcopy(fused_down_k)
    put(p, find(p, Op.DOWN, layer=0, k0=128), "copy", 0)
    caught(p, WHERE.format(op="DOWN") + r": .*GATEUP copy 2 .* K slices of its layer .*copy = 1")


@pytest.mark.parametrize("field, value, match", [
    ("copy", 3, r"GATEUP copy = 3: 0, or under tp = 1 1 or"),
    ("fold", 1, r"GATEUP fold fields .*no copy"),
    ("sum_col0", 2, r"GATEUP fold fields .*range of whole 4-column vectors"),
])
def test_bad_gateup_copy_fields_are_caught(fused_down_k, field, value, match):
    p = copy.deepcopy(fused_down_k)
    put(p, find(p, Op.GATEUP, layer=0, sum_col0=0), field, value)
    caught(p, WHERE.format(op="GATEUP") + ": .*" + match)


def test_gateup_second_copy_on_the_last_layer_is_caught(fused_down_k):
    p = copy.deepcopy(fused_down_k)
    put(p, find(p, Op.GATEUP, layer=p.config.L - 1, sum_col0=0), "copy", 2)
    caught(p, WHERE.format(op="GATEUP") + r": GATEUP copy = 2: .*not on the last layer")


@pytest.mark.parametrize("field, value, match", [
    ("kn", 100, r"\(k0, kn\) = \(\d+, 100\): .*whole 64-column units"),
    ("k0", 64, r"K slice \[64, 256\): the K slices of rows \[\d+, \d+\) must tile \[0, 320\) once"),
    ("kn", 128, r"K slice \[128, 256\): .*must tile \[0, 320\) once"),
    ("copy", 2, r"copy = 2: 0, or 1 under tp = 1"),
    ("copy", 1, r"a K slice with copy = 1 needs that GATEUP copy"),
])
def test_bad_down_k_fields_are_caught(down_k, field, value, match):
    p = copy.deepcopy(down_k)
    put(p, find(p, Op.DOWN, layer=0, k0=128), field, value)
    caught(p, WHERE.format(op="DOWN") + ": .*" + match)


def test_whole_down_with_a_k0_is_caught(base):
    p = copy.deepcopy(base)
    put(p, find(p, Op.DOWN, layer=0), "k0", 64)
    caught(p, WHERE.format(op="DOWN") + r": DOWN \(k0, kn\) = \(64, 0\): \(0, 0\) for the whole")


def test_x_ll_readers_are_flagged_where_down_holds_whole_rows(fused_oproj, base, down_k):
    """MK_LL_X's QKV (layers >= 1) and LMHEAD poll the residual DOWN stores, so at tp = 1 the
    validator counts their waits as flagged hops, like ATTN's, in every plan of whole DOWN
    rows (both of these validate so); not in K-sliced plans, which that build refuses."""
    for p in (fused_oproj, base):
        t = p.table()
        want = (t.op == Op.ATTN) | (t.op == Op.LMHEAD) | ((t.op == Op.QKV) & (t.layer > 0))
        np.testing.assert_array_equal(dataflow.flagged_readers(t, 1), want)
        validate(p)
    t = down_k.table()
    np.testing.assert_array_equal(dataflow.flagged_readers(t, 1), t.op == Op.ATTN)
    np.testing.assert_array_equal(dataflow.flagged_readers(base.table(), 2), base.table().op
                                  == Op.ATTN)


def test_flagged_qkv_after_k_sliced_down_would_be_caught(fused_down_k, monkeypatch):
    """Why K-sliced plans keep QKV's hop deep: their resid[2l] is GATEUP's copy plus the
    DOWN slices' adds, and a polled QKV (if a build let them) would see the adds ordered but
    not the copy, which only DOWN's own wait orders."""
    validate(fused_down_k)
    monkeypatch.setattr(dataflow, "flagged_readers", lambda t, tp: np.isin(
        t.op, [Op.ATTN, Op.LMHEAD]) | ((t.op == Op.QKV) & (t.layer > 0)))
    caught(fused_down_k, r"QKV \(layer 1\).*: reads resid\[level=2,.*written by uid \d+ GATEUP "
           r".*does not happen before it")
