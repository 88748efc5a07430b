"""Bench results: the derived numbers, and the JSON, markdown table and PNG bar chart.

A run is a dict: the stamp (gpu, num_sms, torch, cuda, commit, date), the method (position,
iters, warmup, copy_TBps, read_TBps, ...), notes, and `records`, one per (model, batch, tp,
contender). A record carries ms_per_step (None when the contender was skipped or failed, with
a `note` saying why) and bytes_read_per_step; `derive` adds tokens_per_s, achieved_TBps,
fraction_of_copy_bandwidth and the speedups against eager and the CUDA graph of the same
(model, batch, tp). numpy-free; matplotlib only for the PNG.
"""
from __future__ import annotations

import json
from pathlib import Path

SCHEMA = "megakernel-bench/1"
RECORD_FIELDS = ("model", "batch", "tp", "contender", "ms_per_step", "tokens_per_s",
                 "bytes_read_per_step", "achieved_TBps", "fraction_of_copy_bandwidth",
                 "speedup_vs_eager", "speedup_vs_cuda_graph", "speedup_vs_megakernel_nccl",
                 "note")
RUN_FIELDS = ("schema", "gpu", "num_sms", "torch", "cuda", "commit", "date", "position",
              "iters", "warmup", "copy_TBps", "read_TBps", "method", "notes", "records")
CONTENDER_ORDER = ("eager", "cuda_graph", "compile", "megakernel", "megakernel_nccl",
                   "megakernel_fold", "megakernel_reduce1")


def derive(run: dict) -> dict:
    """Fill every record's derived fields in place (None where ms_per_step is None)."""
    copy = run["copy_TBps"]
    base = {(r["model"], r["batch"], r["tp"], r["contender"]): r["ms_per_step"]
            for r in run["records"]}
    for r in run["records"]:
        ms, key = r["ms_per_step"], (r["model"], r["batch"], r["tp"])
        ok = ms is not None and ms > 0
        tbps = r["bytes_read_per_step"] / (ms / 1e3) / 1e12 if ok else None
        r["tokens_per_s"] = r["batch"] * 1e3 / ms if ok else None
        r["achieved_TBps"] = tbps
        r["fraction_of_copy_bandwidth"] = tbps / copy if ok and copy else None
        for name in ("eager", "cuda_graph", "megakernel_nccl"):
            ref = base.get(key + (name,))
            r[f"speedup_vs_{name}"] = ref / ms if ok and ref else None
        r.setdefault("note", "")
    return run


def write_json(run: dict, path) -> Path:
    path = Path(path)
    path.write_text(json.dumps(run, indent=1))
    return path


def _f(x, fmt: str, missing: str = "-") -> str:
    return missing if x is None else format(x, fmt)


def markdown(run: dict) -> str:
    out = [f"# megakernel bench: {run['gpu']}, {run['date']}", "",
           f"torch {run['torch']} (CUDA {run['cuda']}), commit `{run['commit']}`, "
           f"{run['num_sms']} SMs. Copy bandwidth measured in this run: "
           f"{_f(run['copy_TBps'], '.2f')} TB/s (read + write counted), read "
           f"{_f(run['read_TBps'], '.2f')} TB/s. Position {run['position']}, median of "
           f"{run['iters']} CUDA-event-timed steps after {run['warmup']} warm-up.", "",
           "| model | batch | contender | ms/step | tokens/s | TB/s | of copy BW | speedup vs "
           "eager | speedup vs CUDA graph | note |", "|---|---|---|---|---|---|---|---|---|---|"]
    base = {(r["model"], r["batch"], r.get("tp", 1), r["contender"]): r["ms_per_step"]
            for r in run["records"]}
    for r in _sorted(run["records"]):
        tp = f" tp={r['tp']}" if r.get("tp", 1) > 1 else ""
        vs = r.get("speedup_vs_megakernel_nccl")
        fold = base.get((r["model"], r["batch"], r.get("tp", 1), "megakernel_fold"))
        note = (f"{_f(vs, '.2f')}x vs NCCL between launches; " if vs and
                r["contender"] == "megakernel" else "") + (
                f"{fold / r['ms_per_step']:.2f}x vs fold=True; " if fold and
                r["ms_per_step"] and r["contender"] == "megakernel" else "") + r["note"]
        out.append(f"| {r['model']}{tp} | {r['batch']} | {r['contender']} | "
                   f"{_f(r['ms_per_step'], '.3f')} | {_f(r['tokens_per_s'], ',.0f')} | "
                   f"{_f(r['achieved_TBps'], '.2f')} | "
                   f"{_f(r['fraction_of_copy_bandwidth'], '.0%')} | "
                   f"{_f(r['speedup_vs_eager'], '.2f')} | "
                   f"{_f(r['speedup_vs_cuda_graph'], '.2f')} | {note} |")
    checks = [r for r in run["records"] if r.get("check")]
    if checks:
        out += ["", "## Megakernel correctness (one step, max |logit error| / max |fp32 logit|)",
                "", "| model | batch | contender | its error | bf16 eager | "
                "within 2x bf16 + 2e-3 | note |", "|---|---|---|---|---|---|---|"]
        for r in checks:
            c = r["check"]
            ok = {True: "yes", False: "NO", None: "-"}[c.get("ok")]
            tp = f" tp={r['tp']}" if r.get("tp", 1) > 1 else ""
            out.append(f"| {r['model']}{tp} | {r['batch']} | {r['contender']} | "
                       f"{_f(c.get('megakernel'), '.2e')} | {_f(c.get('bf16_eager'), '.2e')} | "
                       f"{ok} | {c.get('note', '')} |")
    out += ["", "## Method", ""] + [f"- {line}" for line in run["method"]]
    if run["notes"]:
        out += ["", "## Notes", ""] + [f"- {line}" for line in run["notes"]]
    return "\n".join(out) + "\n"


def _sorted(records: list[dict]) -> list[dict]:
    """Models in the order they were run; then batch, tp, contender (CONTENDER_ORDER)."""
    models = list(dict.fromkeys(r["model"] for r in records))
    rank = {c: i for i, c in enumerate(CONTENDER_ORDER)}
    return sorted(records, key=lambda r: (models.index(r["model"]), r["batch"], r["tp"],
                                          rank.get(r["contender"], len(rank)), r["contender"]))


def bar_chart(run: dict, path) -> Path:
    """Share of the copy bandwidth per contender, grouped by (model, batch); each bar is
    labelled with its ms/step. Skipped contenders leave a gap."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    recs = _sorted(run["records"])
    groups = list(dict.fromkeys((r["model"], r["batch"], r["tp"]) for r in recs))
    names = [c for c in CONTENDER_ORDER if any(r["contender"] == c for r in recs)]
    names += sorted({r["contender"] for r in recs} - set(names))
    width = 0.8 / max(len(names), 1)
    fig, ax = plt.subplots(figsize=(max(6.0, 2.2 * len(groups)), 4.8))
    labelled: set[str] = set()
    for k, name in enumerate(names):
        for g, key in enumerate(groups):
            r = next((r for r in recs if (r["model"], r["batch"], r["tp"]) == key
                      and r["contender"] == name), None)
            if r is None or r["fraction_of_copy_bandwidth"] is None:
                continue
            x, y = g + (k - (len(names) - 1) / 2) * width, 100 * r["fraction_of_copy_bandwidth"]
            ax.bar(x, y, width, color=plt.get_cmap("tab10")(k),
                   label=None if name in labelled else name)
            labelled.add(name)
            ax.text(x, y, f"{r['ms_per_step']:.2f}", ha="center", va="bottom", fontsize=7)
    ax.set_xticks(range(len(groups)))
    ax.set_xticklabels([f"{m}\nbatch {b}" + (f" tp {tp}" if tp != 1 else "")
                        for m, b, tp in groups])
    ax.set_ylabel("% of copy bandwidth (weights + KV read / time)")
    top = max([100.0] + [100 * r["fraction_of_copy_bandwidth"] for r in recs
                         if r["fraction_of_copy_bandwidth"] is not None])
    ax.set_ylim(0, 1.18 * top)               # headroom for the legend
    ax.set_title(f"decode step on {run['gpu']} (bar labels: ms/step)")
    ax.legend(frameon=False, ncol=len(names), loc="upper center", fontsize=8)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def write_all(run: dict, out_dir, stem: str, markdown_fn=None, chart_fn=None,
              replot_hint: str = "") -> tuple[list[Path], str | None]:
    """JSON, markdown and (matplotlib permitting) PNG as <out_dir>/<stem>.*; the bench's
    markdown and chart unless others are given (the ablation grid's).
    -> (paths written, why the PNG was not written or None)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = [write_json(run, out_dir / f"{stem}.json")]
    (out_dir / f"{stem}.md").write_text((markdown_fn or markdown)(run))
    paths.append(out_dir / f"{stem}.md")
    try:
        paths.append((chart_fn or bar_chart)(run, out_dir / f"{stem}.png"))
    except ImportError:
        hint = replot_hint or f"`python -m megakernel bench --replot {stem}.json`"
        return paths, f"matplotlib is not installed: redo the PNG elsewhere with {hint}"
    return paths, None
