"""Traces and calibration on the CPU: synthetic timing arrays made by the simulator (with
known constants) stand in for the kernel's %globaltimer stamps. Checks the Perfetto JSON
(one track per SM, a slice per instruction, wait slices), the per-opcode sums, that the fit
recovers the constants, the calibration files plan() resolves, and `trace --from-npz`."""
import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from megakernel.bench import trace
from megakernel.scheduler import GpuSpec, calibration, isa, plan, simulate
from megakernel.scheduler.cost import RING_DEFAULTS, instruction_us
from megakernel.scheduler.ring_model import RingModel, ring_stamps

TRUE = dict(instr_latency_us=2.5, hbm_bytes_per_s=1.6e12, counter_latency_us=1.7)


def synthetic_timing(program, spec) -> np.ndarray:
    """int64 [num_sms, max_len, 3] ns: what the kernel would record if the simulator were
    exact: wait start = the SM's previous end, wait end = simulated start, end."""
    tl = simulate(program, spec)
    t = program.table()
    start, end = np.empty(len(t)), np.empty(len(t))
    start[np.argsort(t.uid)], end[np.argsort(t.uid)] = tl.start_us, tl.end_us
    wait_from = np.where(t.index == 0, 0.0, np.roll(end, 1))
    timing = np.zeros((program.num_sms, program.max_len, 3), np.int64)
    us = np.stack([wait_from, start, end], 1)
    timing[t.sm, t.index] = np.round(us * 1e3).astype(np.int64) + 10 ** 9
    return timing


@pytest.fixture(scope="module")
def traced():
    prog = plan("llama-3.2-1b", batch=1, num_sms=132)
    spec = dataclasses.replace(prog.gpu, **TRUE)
    return prog, spec, synthetic_timing(prog, spec)


def test_chrome_trace_has_one_track_per_sm_and_a_slice_per_instruction(traced, tmp_path):
    prog, spec, timing = traced
    m = calibration.measure(prog, timing)
    path = trace.write_chrome_trace(tmp_path / "trace.json", m, "test")
    events = json.loads(path.read_text())["traceEvents"]
    tracks = {e["tid"]: e["args"]["name"] for e in events if e["name"] == "thread_name"}
    assert tracks == {s: f"SM {s}" for s in range(prog.num_sms) if prog.queue_len[s]}
    work = [e for e in events if e["ph"] == "X" and e["name"] != trace.WAIT_NAME]
    waits = [e for e in events if e["ph"] == "X" and e["name"] == trace.WAIT_NAME]
    per_sm = np.bincount([e["tid"] for e in work], minlength=prog.num_sms)
    assert per_sm.tolist() == prog.queue_len.tolist()
    assert sorted(e["args"]["uid"] for e in work) == list(range(prog.num_instructions))
    assert len(waits) == int((m.t1 > m.t0).sum()) > 0
    qkv = next(e for e in work if e["name"] == "QKV")
    assert {"uid", "layer", "row0", "nrows", "MB"} <= set(qkv["args"])
    tl = simulate(prog, spec)
    total = sum(e["dur"] for e in work)
    assert total == pytest.approx((tl.end_us - tl.start_us).sum(), rel=1e-4)
    for e in waits[:50]:       # a wait ends where its instruction's slice starts
        w = next(x for x in work if x["args"]["uid"] == e["args"]["uid"])
        assert e["ts"] + e["dur"] == pytest.approx(w["ts"], abs=2e-3) and e["tid"] == w["tid"]


def test_per_opcode_table_sums(traced):
    prog, spec, timing = traced
    m = calibration.measure(prog, timing)
    cost = instruction_us(m.table, prog.config, prog.batch, prog.attn_splits, prog.lm_slices,
                          spec, prog.num_sms, 512)
    np.testing.assert_allclose(m.occupancy_us(), cost, atol=2e-3)   # simulator-exact trace
    text = trace.opcode_table(prog, m, {"h100": prog.gpu, "true": spec})
    rows = {line.split()[0]: line.split() for line in text.splitlines()[1:-1]}
    assert set(rows) == {"EMBED", "QKV", "ATTN", "ATTN_OPROJ", "GATEUP", "DOWN", "LMHEAD",
                         "ARGMAX", "all"}
    assert sum(int(r[1]) for k, r in rows.items() if k != "all") == int(rows["all"][1]) \
        == prog.num_instructions
    busy = sum(float(r[3]) for k, r in rows.items() if k != "all")
    assert busy == pytest.approx(float(rows["all"][3]), rel=1e-3)
    assert float(rows["all"][3]) == pytest.approx(m.occupancy_us().sum(), rel=1e-3)
    assert float(rows["QKV"][4]) == pytest.approx(float(rows["QKV"][6]), rel=1e-3)  # = true
    assert "TB/s" in text.splitlines()[-1]


LOADER = dict(slot=0.2, cap=0.3, quiet=0.1, issue=0.05)   # us, the loader's synthetic waits


def synthetic_pages(prog, timing, wait=0.25, page=0.75, lead=1.5, per=4, width=4):
    """Ring-page stamps [num_sms, n, width] ns: `per` pages in each matvec instruction's
    execution, every one waited `wait` us, held `page` us, issued `lead` us before wait end;
    width 8 adds the loader's stamps (slot free, cap passed, copies issued, reached) LOADER
    apart."""
    out = np.zeros((prog.num_sms, 4096, width), np.int64)
    matvec = {int(o) for o in (isa.Op.QKV, isa.Op.OPROJ, isa.Op.ATTN_OPROJ, isa.Op.GATEUP,
                               isa.Op.DOWN, isa.Op.LMHEAD)}    # the ops that stream pages
    for sm, n in enumerate(prog.queue_len):
        k = 0
        for i in range(n):
            if int(prog.instructions[sm, i, 0]) not in matvec:
                continue
            t0, t1 = timing[sm, i, 1], timing[sm, i, 2]
            step = (t1 - t0) // (per + 1)
            for j in range(per):
                got = t0 + step * (j + 1)
                issue = got - lead * 1e3
                out[sm, k, :4] = [issue, got - wait * 1e3, got, got + page * 1e3]
                if width == 8:
                    cap = issue - LOADER["quiet"] * 1e3
                    free = cap - LOADER["cap"] * 1e3
                    out[sm, k, 4:] = [free, cap, issue + LOADER["issue"] * 1e3,
                                      free - LOADER["slot"] * 1e3]
                k += 1
    return out


def test_page_table_recovers_the_stamped_times(traced, tmp_path):
    prog, _, timing = traced
    pages = synthetic_pages(prog, timing)
    rows = {line.split()[0]: line.split() for line in
            trace.page_table(prog, timing, pages).splitlines()[1:]}
    assert set(rows) == {"QKV", "ATTN_OPROJ", "GATEUP", "DOWN", "LMHEAD"}
    per_op = {op.name: 4 * int((prog.instructions[..., 0][
        np.arange(prog.max_len)[None] < prog.queue_len[:, None]] == op).sum())
        for op in (isa.Op.QKV, isa.Op.GATEUP)}
    for name, r in rows.items():
        assert [float(x) for x in r[2:5]] == pytest.approx([0.25, 0.75, 1.5], abs=2e-3), name
        assert r[6] == "100%" and float(r[7]) == pytest.approx(1.5, abs=2e-3), name
    assert int(rows["QKV"][1]) == per_op["QKV"] and int(rows["GATEUP"][1]) == per_op["GATEUP"]
    ready = trace.page_table(prog, timing, synthetic_pages(prog, timing, wait=0.0)).splitlines()
    assert all(line.split()[6:8] == ["0%", "nan"] for line in ready[1:])   # none waited
    kept = trace.save_npz(tmp_path / "t.npz", timing, prog, {"x": 1}, pages)
    back = trace.load_pages(kept)
    assert back.shape[1] < pages.shape[1] and (back == pages[:, :back.shape[1]]).all()
    assert (pages[:, back.shape[1]:] == 0).all()
    assert trace.load_pages(trace.save_npz(tmp_path / "u.npz", timing, prog, {})) is None


def test_issue_timeline_counts_the_issued_pages(traced):
    prog, _, timing = traced
    pages = synthetic_pages(prog, timing)          # 4 pages per matvec, issued 1.5 us ahead
    # a window of +-5 ms around every layer holds each page of the step once per layer
    lines = trace.issue_timeline(prog, timing, pages, bin_us=10.0,
                                 span_us=(-5000.0, 5000.0)).splitlines()
    assert "layers 2-13" in lines[0]                # 16 layers: the first and last two out
    rate = np.array([float(x.split()[1]) for x in lines[1:]])
    assert rate.sum() * 10.0 == pytest.approx(float((pages[..., 0] > 0).sum()), rel=1e-3)
    # by opcode: the columns after TB/s add up to the total, each opcode to its own pages
    names = lines[0].split("(")[0].split()[5:]
    assert set(names) == {"QKV", "ATTN_OPROJ", "GATEUP", "DOWN", "LMHEAD"}
    cols = np.array([[float(v) for v in x.split()[3:]] for x in lines[1:]])
    assert cols.sum(axis=1) == pytest.approx(rate, abs=0.051)
    table = {line.split()[0]: int(line.split()[1])
             for line in trace.page_table(prog, timing, pages).splitlines()[1:]}
    assert cols[:, names.index("GATEUP")].sum() * 10.0 == pytest.approx(table["GATEUP"], rel=1e-3)
    # after the MLP (the previous DOWN's end) the next QKV's pages are already issued: the
    # first bins after 0 hold pages, and a window past the step holds none
    near = trace.issue_timeline(prog, timing, pages, bin_us=1.0, span_us=(-20.0, 20.0))
    assert sum(float(x.split()[1]) for x in near.splitlines()[1:]) > 0
    far = trace.issue_timeline(prog, timing, pages, span_us=(1e6, 1e6 + 4))
    assert [float(x.split()[1]) for x in far.splitlines()[1:]] == [0.0, 0.0]


def test_loader_table_recovers_the_loader_waits(traced):
    prog, _, timing = traced
    assert trace.loader_table(prog, timing, synthetic_pages(prog, timing)) is None  # 4 stamps
    pages = synthetic_pages(prog, timing, width=8)
    lines = trace.loader_table(prog, timing, pages).splitlines()
    assert lines[0].split()[:6] == ["opcode", "pages", "slot", "us", "cap", "us"]
    rows = {line.split()[0]: line.split() for line in lines[1:]}
    assert set(rows) == {"QKV", "ATTN_OPROJ", "GATEUP", "DOWN", "LMHEAD"}
    for name, r in rows.items():
        assert [float(x) for x in r[2:6]] == pytest.approx(list(LOADER.values()), abs=2e-3), name
        assert float(r[6]) > 0 and r[7:9] == ["100%", "100%"], name   # walk: page spacing
    assert rows["QKV"][1] == trace.page_table(prog, timing, pages).splitlines()[1].split()[1]


def test_release_line_reads_the_written_stamp(traced):
    prog, _, timing = traced
    assert trace.release_line(prog, timing) is None            # 3 stamps: none to read
    four = np.concatenate([timing, timing[..., 2:3] - 300], axis=2)
    line = trace.release_line(prog, four)
    assert "QKV 0.30" in line and "ATTN_OPROJ 0.30" in line and "ARGMAX 0.30" in line
    m3, m4 = calibration.measure(prog, timing), calibration.measure(prog, four)
    assert m3.span_us == m4.span_us


@pytest.mark.parametrize("name, batch, num_sms", [("tiny", 2, 8), ("llama-3.2-1b", 1, 132),
                                                  ("llama-3.2-1b", 8, 132)])
def test_fit_recovers_known_constants(name, batch, num_sms):
    prog = plan(name, batch=batch, num_sms=num_sms)
    spec = dataclasses.replace(prog.gpu, **TRUE)
    cal = calibration.fit(prog, synthetic_timing(prog, spec), name="test gpu")
    assert cal.spec.instr_latency_us == pytest.approx(2.5, rel=1e-3)
    assert cal.spec.counter_latency_us == pytest.approx(1.7, abs=2e-3)
    assert cal.spec.sm_bytes_per_s(num_sms) == pytest.approx(spec.sm_bytes_per_s(num_sms),
                                                             rel=1e-3)
    assert cal.fit["r2"] > 0.999 and cal.spec.name == "test gpu"
    assert simulate(prog, cal.spec).total_us == pytest.approx(simulate(prog, spec).total_us,
                                                              rel=1e-3)


def test_measure_rejects_bad_timing(traced):
    prog, _, timing = traced
    with pytest.raises(ValueError, match="shape"):
        calibration.measure(prog, timing[:, :-1])
    broken = timing.copy()
    broken[3, 2] = 0
    with pytest.raises(ValueError, match="1 of .* instructions have no or unordered"):
        calibration.measure(prog, broken)


def test_calibration_files_and_plan_hook(tmp_path, traced):
    prog, _, timing = traced
    cal = calibration.fit(prog, timing, name="nvidia-h100-80gb-hbm3")
    path = calibration.save(cal, "NVIDIA H100 80GB HBM3", tmp_path, commit="abc")
    assert path.name == "nvidia-h100-80gb-hbm3.json"
    assert json.loads(path.read_text())["commit"] == "abc"
    assert calibration.resolve("NVIDIA H100 80GB HBM3", tmp_path) == cal.spec
    # None and preset names stay uncalibrated: default plans are reproducible.
    assert calibration.resolve(None, tmp_path) == GpuSpec.load("h100")
    assert calibration.resolve("h100", tmp_path) == GpuSpec.load("h100")
    assert calibration.resolve("NVIDIA H100 PCIe", tmp_path) == GpuSpec.load("h100")
    with pytest.raises(ValueError, match="nvidia-h100-80gb-hbm3"):
        calibration.resolve("Some B200", tmp_path)
    assert calibration.for_device("Some B200", tmp_path) == GpuSpec.load("h100")
    assert calibration.for_device("NVIDIA H100 80GB HBM3", tmp_path) == cal.spec
    again = plan("llama-3.2-1b", batch=1, num_sms=132, gpu=calibration.resolve(
        "NVIDIA H100 80GB HBM3", tmp_path))
    assert again.gpu == cal.spec and again.predicted_us > prog.predicted_us


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "megakernel", "trace", *map(str, args)],
                          capture_output=True, text=True, timeout=300)


def test_trace_cli_from_npz_with_calibration(tmp_path, traced):
    prog, _, timing = traced
    meta = dict(model="llama-3.2-1b", batch=1, pos=512, policy="dag", granularity="chunk",
                num_sms=132, gpu_spec=prog.gpu.to_dict(), device="NVIDIA H100 80GB HBM3",
                ms_timing_off=2.2, ms_timing_on=2.25, commit="abc", date="today")
    npz = trace.save_npz(tmp_path / "trace.npz", timing, prog, meta)
    r = _cli("--from-npz", npz, "--out", tmp_path / "out", "--calibrate",
             "--calibration-dir", tmp_path / "cal")
    assert r.returncode == 0, r.stderr
    assert json.loads((tmp_path / "out" / "trace.json").read_text())["traceEvents"]
    assert (tmp_path / "out" / "gantt.png").stat().st_size > 10_000
    assert (tmp_path / "cal" / "nvidia-h100-80gb-hbm3.json").is_file()
    assert "+50.0 us" in r.stdout                       # the timing overhead line
    assert "predicted (calibrated)" in r.stdout and "NOT within 25%" in r.stdout
    calibrated = next(line for line in r.stdout.splitlines() if "(calibrated)" in line)
    assert "-> within 25%" in calibrated

    bad = prog.instructions.copy()
    bad[0, 0, 2] += 1
    trace.save_npz(tmp_path / "other.npz", timing, dataclasses.replace(prog, instructions=bad),
                   meta)
    r = _cli("--from-npz", tmp_path / "other.npz", "--out", tmp_path / "out2")
    assert r.returncode == 2 and "another program" in r.stderr and "Traceback" not in r.stderr


def test_trace_cli_reads_a_bare_timing_dump(tmp_path, traced):
    prog, _, timing = traced           # bench/diagnose.py's npz: no metadata
    np.savez_compressed(tmp_path / "dump.npz", timing=timing, instructions=prog.instructions,
                        queue_len=prog.queue_len)
    r = _cli("--from-npz", tmp_path / "dump.npz", "--model", "llama-3.2-1b", "--out",
             tmp_path / "out", "--calibrate", "--calibration-dir", tmp_path, "--device", "GPU X")
    assert r.returncode == 0, r.stderr
    assert "timing overhead" not in r.stdout and (tmp_path / "gpu-x.json").is_file()


def test_trace_without_a_gpu_says_so(tmp_path):
    import torch
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    r = _cli("--out", tmp_path)
    assert r.returncode == 2 and "CUDA GPU" in r.stderr and "Traceback" not in r.stderr


def test_phase_table_reads_the_stamps_ops_took(traced, tmp_path):
    prog, _, timing3 = traced
    timing = np.concatenate([timing3, timing3[..., 2:3] - 400], axis=2)   # written: end - 0.4 us
    t = prog.table()
    phases = np.zeros_like(timing)
    attn, qkv = t.op == isa.Op.ATTN, t.op == isa.Op.QKV
    wait_end = timing[t.sm, t.index, 1]
    for k, us in enumerate((0.5, 1.25, 2.0, 2.5)):          # every ATTN stamps all four
        phases[t.sm[attn], t.index[attn], k] = wait_end[attn] + int(us * 1e3)
    phases[t.sm[qkv], t.index[qkv], 0] = wait_end[qkv] + 300  # QKV only its staging
    rows = {line.split()[0]: line.split() for line in
            trace.phase_table(prog, timing, phases).splitlines()[1:]}
    assert set(rows) == {"ATTN", "QKV"}                     # unstamped opcodes left out
    assert int(rows["ATTN"][1]) == int(attn.sum())
    assert [float(x) for x in rows["ATTN"][2:6]] == [0.5, 1.25, 2.0, 2.5]
    written = np.median(timing[t.sm[attn], t.index[attn], 3] - wait_end[attn]) / 1e3
    assert float(rows["ATTN"][6]) == pytest.approx(written, abs=0.01)
    assert rows["QKV"][2:6] == ["0.30", "-", "-", "-"] and rows["QKV"][7] == "inputs"
    kept = trace.save_npz(tmp_path / "p.npz", timing, prog, {}, phases=phases)
    assert (trace.load_phases(kept) == phases).all()
    unstamped = trace.save_npz(tmp_path / "q.npz", timing, prog, {}, phases=0 * phases)
    assert trace.load_phases(unstamped) is None


def ring_traced(prog, ring, spec):
    """(timing [num_sms, max_len, 3], pages [num_sms, n, 4]) ns: what the kernel's timing
    build would stamp if the ring model (ring_model.ring_stamps) were exact."""
    tl, stamps = ring_stamps(prog, ring, spec)
    t = prog.table()
    start, end = np.empty(len(t)), np.empty(len(t))
    start[np.argsort(t.uid)], end[np.argsort(t.uid)] = tl.start_us, tl.end_us
    timing = np.zeros((prog.num_sms, prog.max_len, 3), np.int64)
    wait_from = np.where(t.index == 0, 0.0, np.roll(end, 1))   # the SM's previous end
    timing[t.sm, t.index] = np.round(np.stack([wait_from, start, end], 1) * 1e3).astype(np.int64)
    pages = np.round(stamps * 1e3).astype(np.int64)
    pages[stamps[..., 3] > 0] += 10 ** 9          # 0 stays "no page"
    return timing + 10 ** 9, pages


@pytest.mark.parametrize("batch", [1, 8])
def test_ring_constants_invert_the_ring_model(batch):
    """ring_constants reads the ring model's constants back off the stamps the model itself
    would leave: the measurement and the model agree on what each constant is."""
    prog = plan("llama-3.2-1b", batch=batch, num_sms=132, kv_position=512)
    true = dict(ring_head_us=2.5, ring_attn_us=3.25, ring_merge_us=1.5, ring_page_us=0.6,
                ring_page_us_tc=0.9)
    spec = dataclasses.replace(prog.gpu, **true)
    timing, pages = ring_traced(prog, RingModel.for_build(batch), spec)
    got = trace.ring_constants(prog, timing, pages, spec)
    page = "ring_page_us_tc" if batch >= 3 else "ring_page_us"
    assert set(got) == {"instructions", page, "ring_head_us", "ring_attn_us", "ring_merge_us"}
    for k in set(got) - {"instructions"}:
        assert got[k] == pytest.approx(true[k], abs=2e-3), k
    # with another queue charge the same stamps read differently: the charge is netted out
    # (at batch 1, whose matvecs start with copies in flight)
    other = trace.ring_constants(prog, timing, pages, dataclasses.replace(spec, ring_queue_us=1.5))
    assert batch == 8 or other["ring_head_us"] < got["ring_head_us"] - 0.1


@pytest.mark.parametrize("name, batch", [
    ("h100-20261206-s23/trace_loader_stamps_6af7232.npz", 1),
    ("h100-20261206-s20/trace_b8_f8b74e2.npz", 8)])
def test_ring_defaults_are_what_committed_traces_give(name, batch):
    """cost.RING_DEFAULTS against two kept H100 traces of 1B. Their programs are today's
    plan() with the queues they ran (isa.py's encoding has not changed since)."""
    path = Path(__file__).resolve().parent.parent / "bench" / "results" / name
    timing, instructions, queue_len, meta = trace.load_npz(path)
    assert meta["batch"] == batch
    prog = plan(meta["model"], batch=batch, num_sms=meta["num_sms"], kv_position=meta["pos"])
    prog = dataclasses.replace(prog, instructions=instructions, queue_len=queue_len,
                               num_counters=int(instructions[..., 7].max()) + 1)
    spec = calibration.for_device(meta["device"])
    got = trace.ring_constants(prog, timing, trace.load_pages(path), spec)
    assert got["instructions"] > 10_000
    page = "ring_page_us_tc" if batch >= 3 else "ring_page_us"
    assert got[page] == pytest.approx(RING_DEFAULTS[page], abs=0.03)
    assert got["ring_head_us"] == pytest.approx(RING_DEFAULTS["ring_head_us"], abs=0.15)
    assert got["ring_merge_us"] == pytest.approx(RING_DEFAULTS["ring_merge_us"], abs=0.3)
    # ATTN: 4.4 us at batch 1 (16 splits of 33 positions), 5.3 at batch 8 (2 of 257)
    assert got["ring_attn_us"] == pytest.approx(RING_DEFAULTS["ring_attn_us"], abs=0.9)


def test_trace_cli_reports_the_ring_model(tmp_path):
    prog = plan("llama-3.2-1b", batch=1, num_sms=132)
    timing, pages = ring_traced(prog, RingModel.for_build(1), prog.gpu)
    meta = dict(model="llama-3.2-1b", batch=1, pos=512, policy="dag", granularity="chunk",
                num_sms=132, gpu_spec=prog.gpu.to_dict(), device="NVIDIA H100 80GB HBM3",
                ms_timing_off=None, ms_timing_on=None, commit="abc", date="today",
                build_flags=[], ablate=[])
    npz = trace.save_npz(tmp_path / "ring.npz", timing, prog, meta, pages)
    r = _cli("--from-npz", npz, "--out", tmp_path / "out")
    assert r.returncode == 0, r.stderr
    line = next(x for x in r.stdout.splitlines() if x.startswith("ring model constants"))
    assert f"ring_head_us {prog.gpu.ring_head_us:.2f} ({prog.gpu.ring_head_us:.2f})" in line
    pred = next(x for x in r.stdout.splitlines() if "predicted (ring model" in x)
    assert "0.0% vs measured" in pred                    # its own stamps: exact


def test_stage_spread_reads_the_noise_on_stage_ends():
    prog = plan("llama-3.2-1b", batch=1, num_sms=132)
    spec = dataclasses.replace(prog.gpu, ring_spread_us=1e-9)
    timing, _ = ring_traced(prog, RingModel.for_build(1), spec)
    quiet = trace.stage_spread(prog, timing)
    noisy = timing.copy()
    ends = noisy[..., 2] > 0
    noise = np.random.default_rng(1).normal(0, 500, ends.sum())     # ns: sigma 0.5 us
    noisy[..., 2][ends] += np.round(noise).astype(np.int64)
    assert quiet < 0.1                                  # the model's own stages end together
    assert trace.stage_spread(prog, noisy) == pytest.approx(0.5, abs=0.1)
    assert trace.stage_spread(prog, timing, min_count=10 ** 6) is None


def test_straggler_table_bins_the_wait_lag_by_the_previous_end(traced):
    prog = traced[0]
    t = prog.table()
    idx = np.flatnonzero((t.op == isa.Op.QKV) & (t.layer == 3))[:12]
    n = len(idx)
    # 12 QKVs: the last signaller ends at 10 us; SM k's previous instruction ended 2 us
    # before it (k < 6), 0.5 us before (k = 6..8) or at it (k = 9, 10; k = 11 was still
    # busy 0.5 us past it: in no bin); they pass their wait 1 us after it, 1.5 us and 3 us
    # after, and end 4 us later
    before = np.r_[np.full(6, -2.0), np.full(3, -0.5), np.zeros(2), 0.5]
    t1 = 10.0 + np.r_[np.full(6, 1.0), np.full(3, 1.5), np.full(3, 3.0)]
    z = np.zeros(n)
    m = calibration.Measured(t.take(idx), z, t1, t1 + 4.0, z, z, np.full(n, 10.0), 10.0 + before)
    rows = {line.split()[0]: line.split() for line in trace.straggler_table(m).splitlines()[1:]}
    assert n == 12 and set(rows) == {"QKV"}
    median = np.median(t1)                               # 1.25 us past the signaller
    assert float(rows["QKV"][1]) == pytest.approx(3.0 - (median - 10.0))
    assert rows["QKV"][2:] == [f"{1.0 - (median - 10):+.2f}", "(6)", f"{1.5 - (median - 10):+.2f}",
                               "(3)", f"{3.0 - (median - 10):+.2f}", "(2)"]
    assert trace.straggler_table(m, min_count=13).splitlines()[1:] == []
