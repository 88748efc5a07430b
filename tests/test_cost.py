"""Cost model and simulator: constants load from dicts/JSON, bytes add up to the model's
weights, the simulated timeline honours every counter dependency, trace export."""
import dataclasses
import json

import numpy as np
import pytest

from megakernel.config import ModelConfig
from megakernel.scheduler import GpuSpec, Op, plan, simulate
from megakernel.scheduler.cost import PRESETS, instruction_bytes_flops, instruction_us


def test_gpu_spec_loads_from_preset_dict_and_json(tmp_path):
    h100 = GpuSpec.load(None)
    assert h100 == GpuSpec.load("h100") and h100.num_sms == 132
    assert h100.hbm_bytes_per_s == 2.95e12
    custom = dict(PRESETS["h100"], name="slow", hbm_bytes_per_s=1e12)
    path = tmp_path / "gpu.json"
    path.write_text(json.dumps(custom))
    assert GpuSpec.load(str(path)) == GpuSpec.load(custom) == GpuSpec.from_dict(custom)
    assert GpuSpec.load(custom).to_dict() == custom
    with pytest.raises(ValueError, match="unknown keys"):
        GpuSpec.load(dict(custom, warp_size=32))
    with pytest.raises(ValueError, match="counter_latency_us must be > 0"):
        GpuSpec.load(dict(custom, counter_latency_us=0))
    with pytest.raises(ValueError, match="not a preset"):
        GpuSpec.load("b200")


def _uid_table(prog):
    t = prog.table()
    return t.take(np.argsort(t.uid))


@pytest.mark.parametrize("name, batch, fuse_oproj", [("tiny", 3, False), ("llama-3.2-1b", 1, False),
                                                     ("llama-3.2-1b", 4, True),
                                                     ("llama-3.2-1b", 8, False),
                                                     ("llama-3.2-1b", 8, True)])
def test_weight_bytes_add_up_to_the_model(name, batch, fuse_oproj):
    """Every weight priced once: whole or K-sliced DOWNs (tiny b3 and 1B b8 take K slices
    by default), fused O projection or not (1B b8 fused: K slices and GATEUP copies)."""
    cfg = ModelConfig.preset(name)
    prog = plan(cfg, batch=batch, num_sms=64, validate=False, fuse_oproj=fuse_oproj)
    assert prog.options["down_k_slices"] == (1 if batch == 1 or fuse_oproj and batch <= 4
                                             else {"tiny": 5, "llama-3.2-1b": 2}[name])
    t = _uid_table(prog)
    spec2 = GpuSpec.load("h100")
    spec1 = dataclasses.replace(spec2, weight_bytes=1)
    args = (t, cfg, batch, prog.attn_splits, prog.lm_slices)
    per_weight_elem = instruction_bytes_flops(*args, spec2, 512)[0] \
        - instruction_bytes_flops(*args, spec1, 512)[0]
    count = {op: int((t.op == op).sum()) for op in Op}
    d, I, L, H, Hkv, D, V = cfg.d, cfg.I, cfg.L, cfg.H, cfg.Hkv, cfg.D, cfg.V
    matrices = L * (d * (H + 2 * Hkv) * D + H * D * d + 3 * d * I) + V * d
    norms = d * (count[Op.QKV] + count[Op.GATEUP] + count[Op.LMHEAD])
    assert per_weight_elem.sum() == matrices + norms + batch * d      # + the embedding rows


def test_time_follows_bandwidth_and_kv_position():
    cfg = ModelConfig.preset("llama-3.2-1b")
    prog = plan(cfg, batch=1, num_sms=132, validate=False)
    t = _uid_table(prog)
    spec = GpuSpec.load("h100")
    fast = dataclasses.replace(spec, hbm_bytes_per_s=2 * spec.hbm_bytes_per_s,
                               sm_max_bytes_per_s=1e15)
    slow = dataclasses.replace(spec, sm_max_bytes_per_s=1e15)
    args = (t, cfg, 1, prog.attn_splits, prog.lm_slices)
    lat = spec.instr_latency_us
    t_slow, t_fast = (instruction_us(*args, s, 132, 512) - lat for s in (slow, fast))
    mv = t.op == Op.GATEUP
    np.testing.assert_allclose(t_fast[mv], t_slow[mv] / 2)
    near, far = (instruction_us(*args, spec, 132, pos) for pos in (16, 8192))
    attn = t.op == Op.ATTN
    assert (far[attn] > 5 * near[attn]).all() and np.array_equal(far[~attn], near[~attn])


@pytest.mark.parametrize("policy", ["rr", "lpt", "dag"])
def test_simulated_timeline_honours_counters_and_queues(policy):
    prog = plan("tiny", batch=2, num_sms=5, policy=policy, granularity="chunk")
    tl = simulate(prog)
    t = _uid_table(prog)
    lat = prog.gpu.counter_latency_us
    assert tl.uid.tolist() == list(range(len(t))) and np.array_equal(tl.sm, t.sm)
    assert tl.total_us == pytest.approx(prog.predicted_us)
    done = np.zeros(prog.num_counters)
    for i in range(len(t)):       # counter completion = last signaler's end
        if t.signal[i] >= 0:
            done[t.signal[i]] = max(done[t.signal[i]], tl.end_us[i])
    for i in range(len(t)):
        ready = max([done[f:f + n].max() + lat for f, n in t.wait_ranges(i)], default=0.0)
        prev = tl.end_us[(t.sm == t.sm[i]) & (t.uid < t.uid[i])].max(initial=0.0)
        assert tl.start_us[i] == pytest.approx(max(ready, prev))
    busy = tl.busy_us()
    assert busy.shape == (5,) and busy.sum() == pytest.approx((tl.end_us - tl.start_us).sum())


def test_simulate_with_another_gpu():
    prog = plan("llama-3.2-1b", batch=1, num_sms=132, validate=False)
    h100 = PRESETS["h100"]
    slower = dict(h100, name="half", hbm_bytes_per_s=h100["hbm_bytes_per_s"] / 2)
    assert simulate(prog, slower).total_us > 1.5 * prog.predicted_us
    floor_us = prog.config.weight_bytes() / h100["hbm_bytes_per_s"] * 1e6
    assert floor_us < prog.predicted_us < 1.5 * floor_us


def test_dag_beats_round_robin_when_waves_are_ragged():
    kw = dict(batch=1, num_sms=132, slices=200, validate=False)
    rr = plan("llama-3.2-1b", policy="rr", **kw).predicted_us
    dag = plan("llama-3.2-1b", policy="dag", **kw).predicted_us
    assert dag < rr


def test_chrome_trace(tmp_path):
    prog = plan("tiny", batch=1, num_sms=4, policy="dag", fuse_oproj=False)
    tl = simulate(prog)
    trace = json.loads(tl.to_chrome_trace(tmp_path / "trace.json").read_text())["traceEvents"]
    spans = [e for e in trace if e["ph"] == "X"]
    names = {e["tid"]: e["args"]["name"] for e in trace if e.get("name") == "thread_name"}
    assert names == {s: f"SM {s}" for s in range(4)}
    assert len(spans) == prog.num_instructions
    assert {e["name"] for e in spans} == {op.name for op in Op
                                          if op not in (Op.NOP, Op.RESID_SUM, Op.ATTN_OPROJ)}
    assert all(e["dur"] >= 0 and 0 <= e["tid"] < 4 for e in spans)
    assert max(e["ts"] + e["dur"] for e in spans) == pytest.approx(tl.total_us, abs=1e-2)
