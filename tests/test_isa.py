"""The instruction set: the checked-in C++ header is generated from scheduler/isa.py, records
round-trip through encode/decode and through the scheduler's numpy tables."""
import numpy as np
import pytest

from megakernel.scheduler import isa
from megakernel.scheduler.isa import Op
from megakernel.scheduler.table import NUM_ARGS, Instrs, placed_from


def test_checked_in_header_is_current():
    assert isa.HEADER_PATH.read_text() == isa.render_header(), \
        "csrc/generated/isa.cuh is stale: run `python scheduler/isa.py` and commit it"


def test_every_opcode_fits_in_a_record():
    for op in Op:
        words = [isa.word_index(op, f) for f in isa.HEADER + isa.ARGS[op]]
        assert sorted(words) == list(range(len(words)))
        assert max(words) < isa.WORDS
    assert NUM_ARGS + len(isa.HEADER) <= isa.WORDS
    assert isa.HEADER.index("signal") == 7 and isa.HEADER.index("uid") == 2


def test_header_names_every_field():
    text = isa.render_header()
    for op in Op:
        assert f"OP_{op.name} = {int(op)}," in text
        for f in isa.ARGS[op]:
            assert f"W_{op.name}_{f.upper()} = {isa.word_index(op, f)};" in text
    assert f"kMaxRowsTimesBatch = {isa.MAX_ROWS_TIMES_BATCH};" in text


@pytest.mark.parametrize("op", list(Op))
def test_encode_decode_round_trip(op):
    rng = np.random.default_rng(int(op))
    for _ in range(20):
        fields = {f: int(rng.integers(-2**31, 2**31)) for f in isa.ARGS[op]}
        waits = [(int(rng.integers(0, 1 << 20)), int(rng.integers(0, 99)))
                 for _ in range(int(rng.integers(0, isa.NUM_WAITS + 1)))]
        rec = isa.encode(op, layer=int(rng.integers(-1, 80)), uid=int(rng.integers(0, 1 << 30)),
                         waits=waits, signal=int(rng.integers(-1, 1 << 20)), **fields)
        assert len(rec) == isa.WORDS
        got = isa.decode(np.asarray(rec, np.int32))
        assert got["op"] == op and {k: got[k] for k in fields} == fields
        assert got["uid"] == rec[2] and got["signal"] == rec[7]
        for k, (first, count) in enumerate(waits):
            assert (got[f"wait{k}_first"], got[f"wait{k}_count"]) == (first, count)


def test_encode_rejects_bad_records():
    with pytest.raises(ValueError, match="wait ranges"):
        isa.encode(Op.ARGMAX, waits=[(0, 1)] * (isa.NUM_WAITS + 1))
    with pytest.raises(ValueError, match="missing fields"):
        isa.encode(Op.QKV, row0=0)
    with pytest.raises(ValueError, match="unknown"):
        isa.encode(Op.ARGMAX, row0=0)
    with pytest.raises(KeyError, match="no field"):
        isa.word_index(Op.ATTN, "row0")


def test_numpy_tables_round_trip_through_records():
    rng = np.random.default_rng(0)
    ops = rng.choice([int(o) for o in Op if o != Op.NOP], size=50)
    args = np.zeros((50, NUM_ARGS), np.int32)
    for i, o in enumerate(ops):
        args[i, :len(isa.ARGS[Op(o)])] = rng.integers(0, 1000, len(isa.ARGS[Op(o)]))
    ins = Instrs(op=ops.astype(np.int32), layer=rng.integers(-1, 9, 50).astype(np.int32),
                 args=args, waits=rng.integers(0, 100, (50, 2 * isa.NUM_WAITS)).astype(np.int32),
                 signal=rng.integers(-1, 100, 50).astype(np.int32),
                 all_ranks=rng.integers(0, 2, 50).astype(np.int32))
    uid = rng.permutation(50).astype(np.int32)
    rec = ins.to_records(uid)
    for i in range(50):
        expect = isa.encode(Op(ops[i]), layer=int(ins.layer[i]), uid=int(uid[i]),
                            waits=[tuple(ins.waits[i, 2 * k:2 * k + 2]) for k in range(2)],
                            signal=int(ins.signal[i]), all_ranks=int(ins.all_ranks[i]),
                            **dict(zip(isa.ARGS[Op(ops[i])], args[i].tolist())))
        assert rec[i].tolist() == expect
    queues = np.zeros((2, 30, isa.WORDS), np.int32)
    queues[0, :25], queues[1, :25] = rec[:25], rec[25:]
    back = placed_from(queues, np.array([25, 25], np.int32))
    for f in ("op", "layer", "args", "waits", "signal", "uid"):
        assert np.array_equal(getattr(back, f), getattr(ins, f, uid) if f != "uid" else uid)
    assert back.sm.tolist() == [0] * 25 + [1] * 25 and back.index.tolist() == list(range(25)) * 2
