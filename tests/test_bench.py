"""The bench on the CPU: report formatting (derived numbers, markdown, JSON fields, PNG), the
command line (help, argument errors, a clear message where there is no GPU), the child
process runner behind the torch.compile contender (result, failure, deadline)."""
import argparse
import json
import subprocess
import sys
import time

import pytest
import torch

from megakernel import ModelConfig, cli
from megakernel.bench import baselines, harness, report

NO_GPU = pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")


def fake_run():
    recs = []
    for model, nbytes, times in (("llama-3.2-1b", 2.5e9, (11.4, 2.04, None, 1.1)),
                                 ("llama-3.1-8b", 16.1e9, (22.5, 7.73, 7.99, 6.1))):
        for contender, ms in zip(report.CONTENDER_ORDER, times):
            rec = dict(model=model, batch=1, tp=1, contender=contender, ms_per_step=ms,
                       bytes_read_per_step=nbytes, note="" if ms else "skipped: too slow")
            if contender == "megakernel":
                rec["check"] = {"megakernel": 1.1e-3, "bf16_eager": 9e-4, "ok": True}
            recs.append(rec)
    return dict(schema=report.SCHEMA, gpu="NVIDIA H100 80GB HBM3", num_sms=132, torch="2.11",
                cuda="13.0", commit="abc123", date="2026-11-22", position=512, iters=100,
                warmup=10, copy_TBps=3.0, read_TBps=2.9, method=["same weights"],
                notes=["a note"], records=recs)


def test_derived_numbers():
    run = report.derive(fake_run())
    by = {(r["model"], r["contender"]): r for r in run["records"]}
    mk = by["llama-3.2-1b", "megakernel"]
    assert mk["tokens_per_s"] == pytest.approx(1e3 / 1.1)
    assert mk["achieved_TBps"] == pytest.approx(2.5e9 / 1.1e-3 / 1e12)
    assert mk["fraction_of_copy_bandwidth"] == pytest.approx(mk["achieved_TBps"] / 3.0)
    assert mk["speedup_vs_eager"] == pytest.approx(11.4 / 1.1)
    assert mk["speedup_vs_cuda_graph"] == pytest.approx(2.04 / 1.1)
    skipped = by["llama-3.2-1b", "compile"]
    assert skipped["tokens_per_s"] is None and skipped["speedup_vs_eager"] is None
    assert by["llama-3.1-8b", "cuda_graph"]["speedup_vs_cuda_graph"] == 1.0


def test_outputs_json_markdown_png(tmp_path):
    run = report.derive(fake_run())
    paths, why = report.write_all(run, tmp_path, "bench_test")
    assert why is None and [p.suffix for p in paths] == [".json", ".md", ".png"]
    data = json.loads(paths[0].read_text())
    assert set(report.RUN_FIELDS) <= set(data)
    for rec in data["records"]:
        assert set(report.RECORD_FIELDS) <= set(rec)
    md = paths[1].read_text()
    lines = md.splitlines()
    assert "NVIDIA H100 80GB HBM3" in lines[0] and "abc123" in md and "3.00 TB/s" in md
    rows = [line for line in lines if line.startswith("| llama")]
    assert len(rows) == 8 + 2                 # the contender table + the correctness table
    assert rows[0].startswith("| llama-3.2-1b | 1 | eager | 11.400 |")   # run order kept
    assert "| llama-3.2-1b | 1 | megakernel | 1.100 | 909 | 2.27 | 76% | 10.36 | 1.85 |" in md
    assert "skipped: too slow" in md and "## Method" in md and "- a note" in md
    assert paths[2].stat().st_size > 10_000
    assert paths[2].read_bytes()[:4] == b"\x89PNG"


def test_replot(tmp_path):
    path = report.write_json(report.derive(fake_run()), tmp_path / "bench_x.json")
    assert cli.main(["bench", "--replot", str(path)]) == 0
    assert (tmp_path / "bench_x.md").is_file() and (tmp_path / "bench_x.png").is_file()


def test_help_lists_bench_and_trace(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert "bench" in out and "trace" in out


def test_bytes_read_per_step():
    cfg = ModelConfig.preset("llama-3.2-1b")
    weights, kv = harness.bytes_read(cfg, batch=8, pos=512)
    assert weights == cfg.weight_bytes(2) + 8 * cfg.d * 2
    assert kv == 2 * cfg.L * 8 * cfg.Hkv * 513 * cfg.D * 2
    assert 2.4e9 < weights < 2.6e9                       # BRIEF.md: 2.47 GB of weights


def _bench_args(**kw):
    p = argparse.ArgumentParser()
    from megakernel import bench_cli
    bench_cli.add_arguments(p)
    return bench_cli, p.parse_args([f"--{k}={v}" for k, v in kw.items()])


def test_bench_arguments_are_checked():
    bench_cli, args = _bench_args(contenders="eager,megakernel")
    cfgs, batches, contenders = bench_cli._checked(args)
    assert [c.name for c in cfgs] == ["llama-3.2-1b"] and batches == [1]
    assert contenders == ["eager", "megakernel"]
    for kw, match in ((dict(contenders="eager,jax"), "choose from"), (dict(batch=0), "--batch"),
                      (dict(model="llama-9"), "preset"), (dict(iters=0), "--iters")):
        with pytest.raises(ValueError, match=match):
            bench_cli._checked(_bench_args(**kw)[1])


def _megakernel(*args):
    return subprocess.run([sys.executable, "-m", "megakernel", *args], capture_output=True,
                          text=True, timeout=120)


@NO_GPU
def test_bench_without_a_gpu_says_so():
    r = _megakernel("bench", "--model", "llama-3.2-1b", "--batch", "1")
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "CUDA GPU" in r.stderr and "device_bench.sh" in r.stderr
    r = _megakernel("bench", "--contenders", "eager,jax")
    assert r.returncode == 2 and "choose from" in r.stderr and "Traceback" not in r.stderr


def test_child_runner_returns_json_failure_or_timeout():
    res, note = baselines.run_child(["-c", "print('warming up'); print('{\"ms\": [1.5]}')"], 30)
    assert res == {"ms": [1.5]} and note == ""
    res, note = baselines.run_child(["-c", "import sys; sys.exit('compile blew up')"], 30)
    assert res is None and note == "failed (exit 1): compile blew up"
    t0 = time.perf_counter()
    res, note = baselines.run_child(["-c", "import time; time.sleep(60)"], 1)
    assert res is None and "not done within 1 s" in note
    assert time.perf_counter() - t0 < 20


@NO_GPU
def test_compile_child_fails_cleanly_without_a_gpu():
    res, note = baselines.compile_child("tiny", 1, 16, 3, 1, 120)
    assert res is None and note.startswith("failed (exit 2)") and "CUDA GPU" in note
