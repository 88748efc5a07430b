"""`python -m megakernel ablate` on the CPU: the grid (unique names, Decoder kwargs, one change
per row, every row plans with a prediction), --rows, the table / JSON / PNG of synthetic
measurements, the row loop's skips and failures (builds as stand-in child processes, timing
faked), the exit status, the help and the message where there is no GPU."""
import argparse
import inspect
import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from megakernel import ModelConfig, ablate_cli, cli
from megakernel.bench import ablate, harness
from megakernel.decoder import Decoder
from megakernel.runtime import MODES
from megakernel.scheduler import calibration, isa, plan
from megakernel.scheduler.plan import OPTIONS

NO_GPU = pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
H100 = "NVIDIA H100 80GB HBM3"


def test_grid_rows_are_unique_decoder_kwargs():
    rows = ablate.grid(132)
    names = [r.name for r in rows]
    assert len(set(names)) == len(names) == 72 and names[0] == ablate.BASELINE
    assert rows[0].kwargs == {} and not rows[0].diagnostic
    allowed = (set(inspect.signature(Decoder.__init__).parameters)
               | set(inspect.signature(plan).parameters) | set(OPTIONS))
    changes = set()
    for r in rows:
        assert isinstance(r.kwargs, dict) and set(r.kwargs) <= allowed, r.name
        # one change, or one more than another row (a variant of it: fuse_oproj_rows,
        # claim_tail=lmhead)
        assert len(r.kwargs) + r.strip_waits <= 1 or any(
            o.kwargs.items() < r.kwargs.items() and len(r.kwargs) == len(o.kwargs) + 1
            for o in rows), f"{r.name} changes more than one thing"
        assert set(r.kwargs.get("ablate", ())) <= set(MODES)
        assert all(f.startswith("-DMK_") for f in r.kwargs.get("build_flags", ()))
        changes |= {(k, v if not isinstance(v, tuple) else v[0]) for k, v in r.kwargs.items()}
    assert {("ablate", "no_prefetch"), ("policy", "rr"), ("policy", "lpt"), ("policy", "queue"),
            ("claim_tail", "lmhead"), ("lmhead_slices", 528), ("build_flags", "-DMK_CLAIMS=1"),
            ("build_flags", "-DMK_CLAIM_AHEAD=0"), ("build_flags", "-DMK_CLAIM_REC=0"),
            ("granularity", "layer"), ("granularity", "head"), ("attn_splits", 4),
            ("attn_splits", 8), ("attn_splits", 32), ("reduce_slices", 1), ("fuse_reduce", True), ("fuse_oproj", False), ("fuse_oproj", True),
            ("build_flags", "-DMK_FUSE_OPROJ=0"), ("down_k_slices", 1), ("down_k_slices", 2), ("build_flags", "-DMK_TC_SPLIT=0"),
            ("build_flags", "-DMK_ATTN_TWICE=1"), ("build_flags", "-DMK_TC_WARP_ACC=0"),
            ("oproj_col_slices", 1), ("variant", "default"), ("build_flags", "-DMK_B1_STAGE_AHEAD=0"),
            ("num_sms", 66), ("build_flags", "-DMK_NUM_PAGES=2"),
            ("build_flags", "-DMK_RAW_SLOT=0"), ("build_flags", "-DMK_LL_PARTIALS=1"),
            ("build_flags", "-DMK_LL_Q=1"), ("build_flags", "-DMK_LL_Q=0"),
            ("build_flags", "-DMK_B1_TC=1"), ("build_flags", "-DMK_LL_X=1"),
            ("build_flags", "-DMK_WARPGROUPS=0"), ("build_flags", "-DMK_LL_PARTIALS=0"),
            ("build_flags", "-DMK_SETUP_FIRST=0"),
            ("build_flags", "-DMK_INFLIGHT_PAGES=0"),
            ("build_flags", "-DMK_INFLIGHT_PAGES=1"), ("build_flags", "-DMK_INFLIGHT_PAGES=3"),
            ("build_flags", "-DMK_INPUT_LEAD=3"), ("build_flags", "-DMK_ROW_TILE_B1=4"), ("build_flags", "-DMK_INPUT_LEAD=6"),
            ("build_flags", "-DMK_INPUT_PREFETCH=0"),
            ("build_flags", "-DMK_PREFETCH_KV=0"), ("build_flags", "-DMK_L2_PREFETCH_PAGES=8"),
            ("build_flags", "-DMK_WARP_RELEASE=1"), ("build_flags", "-DMK_WARP_ACC=0"),
            ("build_flags", "-DMK_TC_MIN_BUCKET=1"), ("build_flags", "-DMK_RECORD_SMEM=0"),
            ("build_flags", "-DMK_RELEASE_QUIET=0"), ("build_flags", "-DMK_RELEASE_QUIET=2"),
            ("build_flags", "-DMK_QUIET_INPUTS=1"), ("build_flags", "-DMK_QUIET_INPUTS=2"),
            ("build_flags", "-DMK_QUIET_WAIT_NS=1000"), ("build_flags", "-DMK_QUIET_WAIT_NS=2000"),
            ("build_flags", "-DMK_MV_VEC4=1"), ("build_flags", "-DMK_COPY_KB=64"), ("build_flags", "-DMK_MV_SCATTER=0"),
            ("build_flags", "-DMK_CHAIN_INFLIGHT=0"), ("build_flags", "-DMK_CHAIN_QKV=0"),
            ("build_flags", "-DMK_CHAIN_DOWN=0"),
            ("build_flags", "-DMK_ATTN_EXACT_G=0"), ("ablate", "no_compute"), ("ablate", "no_load")} == changes
    assert {r.name for r in rows if r.diagnostic} == {"no_waits", "no_compute", "no_load"}
    assert [r.name for r in rows if r.strip_waits] == ["no_waits"]
    assert {r.name for r in rows if not r.modelled} == {
        "no_prefetch", "variant=default", "MK_B1_STAGE_AHEAD=0", "MK_NUM_PAGES=2", "MK_RAW_SLOT=0", "MK_INFLIGHT_PAGES=0",
        "MK_INFLIGHT_PAGES=1", "MK_INFLIGHT_PAGES=3", "MK_INPUT_LEAD=3", "MK_INPUT_LEAD=6", "MK_ROW_TILE_B1=4",
        "MK_INPUT_PREFETCH=0",
        "MK_PREFETCH_KV=0", "MK_L2_PREFETCH_PAGES=8", "MK_L2_PREFETCH_PAGES=8+MK_L2_STALL_NS=0",
        "MK_WARP_RELEASE=1", "MK_WARP_ACC=0", "MK_TC_MIN_BUCKET=1", "MK_RECORD_SMEM=0",
        "MK_RELEASE_QUIET=0", "MK_RELEASE_QUIET=2",
        "MK_QUIET_INPUTS=1", "MK_QUIET_INPUTS=2", "MK_QUIET_WAIT_NS=1000", "MK_QUIET_WAIT_NS=2000",
        "MK_MV_VEC4=1", "MK_MV_SCATTER=0", "MK_COPY_KB=64",
        "MK_CHAIN_INFLIGHT=0", "MK_CHAIN_QKV=0", "MK_CHAIN_DOWN=0",
        "MK_ATTN_EXACT_G=0", "MK_SETUP_FIRST=0", "MK_FUSE_OPROJ=0", "MK_TC_SPLIT=0", "MK_ATTN_TWICE=1", "MK_TC_WARP_ACC=0",
        "MK_LL_PARTIALS=1+MK_FUSE_OPROJ=0", "MK_LL_Q=0", "MK_LL_Q=1", "MK_B1_TC=1",
        "MK_LL_X=1", "MK_LL_X=1+MK_LL_X_SLEEP_NS=0", "MK_WARPGROUPS=0", "MK_LL_PARTIALS=0",
        "MK_LL_PARTIALS=1",
        "MK_LL_Q=1+MK_LL_PARTIALS=1+MK_FUSE_OPROJ=0", "MK_CLAIMS=1",
        "policy=queue+MK_CLAIM_AHEAD=0", "policy=queue+MK_CLAIM_REC=0", "no_compute", "no_load"}
    by_name = {r.name: r for r in rows}
    combined = by_name["MK_L2_PREFETCH_PAGES=8+MK_L2_STALL_NS=0"]
    assert combined.kwargs["build_flags"] == ("-DMK_L2_PREFETCH_PAGES=8", "-DMK_L2_STALL_NS=0")
    assert {r.name: r for r in ablate.grid(114)}["half_sms"].kwargs == {"num_sms": 57}


def test_every_row_plans_with_a_prediction():
    cfg, spec = ModelConfig.preset("llama-3.2-1b"), calibration.for_device(H100)
    progs = {r.name: ablate.plan_row(r, cfg, 1, 300, 132, spec) for r in ablate.grid(132)}
    base = progs[ablate.BASELINE]
    assert base.options["kv_position"] == 300 and base.gpu == spec and base.num_sms == 132
    for name, p in progs.items():
        assert p.predicted_us > 0, name
    for row in ablate.grid(132):
        if not row.modelled and set(row.kwargs) <= set(ablate.RUNTIME_KEYS):  # kernel only
            np.testing.assert_array_equal(progs[row.name].instructions, base.instructions)
    lo = isa.HEADER.index("wait0_first")
    stripped = progs["no_waits"].instructions
    assert not stripped[..., lo:lo + 4].any() and base.instructions[..., lo:lo + 4].any()
    np.testing.assert_array_equal(np.delete(stripped, range(lo, lo + 4), axis=2),
                                  np.delete(base.instructions, range(lo, lo + 4), axis=2))
    assert progs["no_waits"].predicted_us < base.predicted_us
    assert progs["half_sms"].num_sms == 66 and progs["policy=rr"].policy == "rr"
    assert progs["attn_splits=32"].attn_splits == 32
    assert progs["granularity=layer"].num_counters < base.num_counters
    queue, tail = progs["policy=queue"], progs["claim_tail=lmhead"]
    assert queue.claim_len == queue.num_instructions and not queue.queue_len.any()
    assert tail.lm_slices == 4 * 132 and tail.claim_len == tail.lm_slices + 1 and \
        set(tail.claim[:, 0]) == {isa.Op.LMHEAD, isa.Op.ARGMAX} and not base.claim_len


def test_rows_subset():
    rows = ablate.grid()
    assert [r.name for r in ablate.select(rows, None)] == [r.name for r in rows]
    got = ablate.select(rows, "no_load, policy=rr,MK_RAW_SLOT=0")
    assert [r.name for r in got] == ["default", "policy=rr", "MK_RAW_SLOT=0", "no_load"]
    assert [r.name for r in ablate.select(rows, "default")] == ["default"]
    for bad in ("policy=xx", "", " , "):
        with pytest.raises(ValueError, match="rows: default,no_prefetch"):
            ablate.select(rows, bad)


def fake_run():
    rows = {r.name: r for r in ablate.grid()}
    recs = [ablate.record(rows["default"], ms_per_step=1.25, ms_min=1.2, ms_p90=1.3,
                          predicted_ms=1.0, ring_ms=0.9, setup_s=40.0),
            ablate.record(rows["policy=rr"], ms_per_step=1.5, predicted_ms=1.2, ring_ms=1.08,
                          logits_rel_diff=3e-3, argmax_equal=False),
            ablate.record(rows["MK_NUM_PAGES=2"], predicted_ms=1.0,
                          note="skipped: build failed (exit 1): nvcc error"),
            ablate.record(rows["no_waits"], ms_per_step=1.0, predicted_ms=0.9)]
    return dict(schema=ablate.SCHEMA, gpu=H100, num_sms=132, torch="2.11", cuda="13.0",
                commit="abc123", date="2026-11-23", model="llama-3.2-1b", batch=1,
                position=512, iters=100, warmup=10, copy_TBps=3.0, cost_model="h100-cal",
                bytes_read_per_step=2.5e9, method=["same weights"], notes=["a note"],
                records=recs)


def test_derived_ratios_and_bandwidth():
    run = ablate.derive(fake_run())
    by = {r["name"]: r for r in run["records"]}
    assert by["default"]["time_vs_default"] == 1.0
    assert by["policy=rr"]["time_vs_default"] == pytest.approx(1.2)
    assert by["policy=rr"]["predicted_vs_default"] == pytest.approx(1.2)
    assert by["no_waits"]["time_vs_default"] == pytest.approx(0.8)
    assert by["default"]["achieved_TBps"] == pytest.approx(2.0)
    assert by["default"]["fraction_of_copy_bandwidth"] == pytest.approx(2.0 / 3.0)
    skipped = by["MK_NUM_PAGES=2"]
    assert skipped["time_vs_default"] is None and skipped["achieved_TBps"] is None
    assert skipped["predicted_vs_default"] == 1.0
    failed = fake_run()
    failed["records"][0]["ms_per_step"] = None       # no baseline: no ratios, no crash
    assert ablate.derive(failed)["records"][1]["time_vs_default"] is None


def test_outputs_json_markdown_png(tmp_path):
    run = ablate.derive(fake_run())
    paths, why = ablate.write_all(run, tmp_path / "res", "ablate_test")
    assert why is None and [p.suffix for p in paths] == [".json", ".md", ".png"]
    data = json.loads(paths[0].read_text())
    assert data["schema"] == ablate.SCHEMA and len(data["records"]) == 4
    for rec in data["records"]:
        assert set(rec) == set(ablate.RECORD_FIELDS)
    assert data["records"][2]["kwargs"] == {"build_flags": ["-DMK_NUM_PAGES=2"]}
    md = paths[1].read_text()
    assert md.startswith("# megakernel ablation: llama-3.2-1b batch 1 on " + H100)
    assert "abc123" in md and "3.00 TB/s" in md and "`h100-cal`" in md
    rows = [line for line in md.splitlines() if line.startswith("| ") and "---" not in line]
    assert len(rows) == 1 + 4
    assert rows[1].startswith("| default | nothing") and "| 1.250 | 1.00 | 1.000 | 1.00 | " \
        "0.900 (1.00) | 2.00 | 67% | - | 40.0 |" in rows[1]
    assert "| 1.500 | 1.20 | 1.200 | 1.20 | 1.080 (1.20) |" in rows[2]
    assert "3.0e-03, argmax differs" in rows[2]
    assert "| - | - | 1.000 (not modelled) | 1.00 | - |" in rows[3] and "nvcc error" in rows[3]
    assert rows[4].startswith("| no_waits † |") and "† diagnostic" in md
    assert "## Method" in md and "- a note" in md
    assert paths[2].read_bytes()[:4] == b"\x89PNG" and paths[2].stat().st_size > 10_000


class FakeRows:
    """time_row stand-in: fails one row, records what reference logits each row was given."""

    def __init__(self, fail: str):
        self.fail, self.seen = fail, {}

    def __call__(self, row, program, cfg, w, inputs, args, flush, ref_logits):
        self.seen[row.name] = ref_logits
        if row.name == self.fail:
            raise RuntimeError("megakernel watchdog: a counter wait exceeded its budget\nmore")
        return {"ms_per_step": 1.0 + len(self.seen), "setup_s": 0.1,
                "logits": None if row.diagnostic else f"logits of {row.name}"}


def _run_rows(monkeypatch, names, fail="", build_code=None, timeout=None):
    fake = FakeRows(fail)
    monkeypatch.setattr(ablate_cli, "time_row", fake)
    if build_code:
        monkeypatch.setattr(ablate_cli, "BUILD_CODE", build_code)
    if timeout:
        monkeypatch.setattr(ablate_cli, "BUILD_TIMEOUT_S", timeout)
    rows = ablate.select(ablate.grid(8), names)
    lines = []
    builds = ablate_cli.Builds([ablate.runtime_kwargs(r).get("build_flags", ()) for r in rows],
                               lines.append)
    args = argparse.Namespace(batch=1, pos=16)
    recs = ablate_cli.run_rows(rows, ModelConfig.preset("tiny"), None, None, args, builds,
                               calibration.for_device(H100), 8, None, lines.append)
    return {r["name"]: r for r in recs}, fake, lines


def test_row_loop_skips_failed_builds_and_goes_on(monkeypatch):
    code = "import sys; sys.exit('nvcc: boom') if '-DMK_NUM_PAGES=2' in sys.argv else None"
    recs, fake, lines = _run_rows(monkeypatch, "policy=rr,MK_NUM_PAGES=2,MK_RAW_SLOT=0,"
                                  "no_waits", fail="policy=rr", build_code=code)
    assert list(recs) == ["default", "policy=rr", "MK_NUM_PAGES=2", "MK_RAW_SLOT=0",
                          "no_waits"]
    assert recs["default"]["ms_per_step"] == 2.0 and recs["default"]["predicted_ms"] > 0
    assert "logits" not in recs["default"]
    assert recs["policy=rr"]["ms_per_step"] is None and recs["policy=rr"]["predicted_ms"] > 0
    assert recs["policy=rr"]["note"] == ("failed: RuntimeError: megakernel watchdog: a "
                                         "counter wait exceeded its budget")
    assert recs["MK_NUM_PAGES=2"]["note"] == "skipped: build failed (exit 1): nvcc: boom"
    assert "MK_NUM_PAGES=2" not in fake.seen and recs["MK_NUM_PAGES=2"]["predicted_ms"] > 0
    assert recs["MK_RAW_SLOT=0"]["ms_per_step"] is not None
    assert fake.seen["default"] is None
    assert fake.seen["MK_RAW_SLOT=0"] == fake.seen["no_waits"] == "logits of default"
    assert any("row 5/5 no_waits" in line for line in lines)
    assert sum("build (" in line for line in lines) == 3       # (), pages 2, raw slot 0


def test_a_hung_build_is_killed(monkeypatch):
    recs, fake, lines = _run_rows(monkeypatch, "MK_RAW_SLOT=0", timeout=2, build_code=(
        "import sys, time; time.sleep(60) if len(sys.argv) > 1 else None"))
    assert recs["default"]["ms_per_step"] is not None
    assert recs["MK_RAW_SLOT=0"]["note"] == "skipped: build not done within 2 s (killed)"


def test_exit_status_follows_the_default_row(monkeypatch, tmp_path):
    def fake_grid(cfg, args, device, log):
        run = fake_run()
        run["records"][0]["ms_per_step"] = default_ms
        return run

    monkeypatch.setattr(harness, "require_gpu", lambda command: "cuda:0")
    monkeypatch.setattr(ablate_cli, "run_grid", fake_grid)
    for default_ms, rc in ((1.25, 0), (None, 1)):
        out = tmp_path / str(rc)
        assert cli.main(["ablate", "--out", str(out)]) == rc
        assert sorted(p.suffix for p in out.iterdir()) == [".json", ".md", ".png"]
        assert next(out.glob("*.md")).name.startswith("ablate_llama-3-2-1b_b1_nvidia-h100")


def test_help_lists_ablate(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["--help"])
    assert e.value.code == 0 and "ablate" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        cli.main(["ablate", "--help"])
    out = capsys.readouterr().out
    assert all(f"--{o}" in out for o in ("model", "batch", "pos", "iters", "rows", "out"))


def _megakernel(*args):
    return subprocess.run([sys.executable, "-m", "megakernel", *args], capture_output=True,
                          text=True, timeout=120)


@NO_GPU
def test_ablate_without_a_gpu_says_so():
    r = _megakernel("ablate", "--rows", "policy=rr")
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr.startswith("ablate: ") and "CUDA GPU" in r.stderr
    for bad, says in ((("--rows", "policy=xx"), "unknown row"),
                      (("--batch", "99"), "batch 99"), (("--iters", "0"), "--iters")):
        r = _megakernel("ablate", *bad)
        assert r.returncode == 2 and says in r.stderr and "Traceback" not in r.stderr
