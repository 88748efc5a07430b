"""The ablation grid of `python -m megakernel ablate` and its results: the rows (each changes
one overlap mechanism from the default), the Program a row plans, and the derived numbers,
JSON, markdown table and PNG bar chart of a run. torch-free (numpy through the scheduler;
matplotlib only for the PNG).

A row is Decoder kwargs: plan arguments and options (policy, granularity, num_sms,
attn_splits, ...) go to plan() together with the device's calibration and the timed position,
and `ablate` / `build_flags` go to the Runtime. Diagnostic rows give wrong results and exist
only to time one part of the pipeline (see bench/NOTES.md): `no_waits` zeroes every
instruction's wait words (3..6), queued or claimed, `no_compute` / `no_load` skip the
consumers' math / the weight copies. A run's records carry ms_per_step (None with a `note`
when the row was skipped or failed) and predicted_ms; `derive` adds the ratios to the
default row and the bandwidth.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

from . import report

SCHEMA = "megakernel-ablate/1"
BASELINE = "default"
RUNTIME_KEYS = ("ablate", "build_flags", "variant")  # Decoder kwargs for the Runtime, not plan()
RECORD_FIELDS = ("name", "change", "kwargs", "diagnostic", "modelled", "ms_per_step",
                 "ms_min", "ms_p90", "predicted_ms", "time_vs_default",
                 "predicted_vs_default", "ring_ms", "ring_vs_default", "achieved_TBps",
                 "fraction_of_copy_bandwidth", "logits_rel_diff", "argmax_equal", "setup_s",
                 "note")


@dataclasses.dataclass(frozen=True)
class Row:
    name: str
    change: str                     # what it changes, for the table
    kwargs: dict                    # Decoder kwargs
    strip_waits: bool = False       # plan, then zero every instruction's wait words
    diagnostic: bool = False        # wrong results: timing only

    @property
    def modelled(self) -> bool:
        """Whether the cost model sees the change (it sees the plan, not the kernel)."""
        return not any(k in self.kwargs for k in RUNTIME_KEYS)


def grid(num_sms: int = 132) -> list[Row]:
    """Every row, the default first; num_sms: the device's SM count (one row uses half)."""
    def flag(macro, value, change, *more):
        """A row of kernel build flags: macro=value, plus more "-DMK_...=..." flags."""
        return Row(f"{macro}={value}" + "".join(f"+{m[2:]}" for m in more), change,
                   {"build_flags": (f"-D{macro}={value}",) + more})
    return [
        Row(BASELINE, "nothing: plan defaults, every mechanism on", {}),
        Row("no_prefetch", "the loader starts an instruction's weights only once its "
            "waits hold", {"ablate": ("no_prefetch",)}),
        Row("policy=rr", "round-robin SM assignment", {"policy": "rr"}),
        Row("policy=lpt", "cost-balanced SM assignment, no dependency model",
            {"policy": "lpt"}),
        Row("policy=queue", "global work queue: every instruction claimed at run time with "
            "an atomic, in the dag policy's order", {"policy": "queue"}),
        Row("policy=queue+MK_CLAIM_AHEAD=0", "the global work queue, an SM claiming its "
            "next instruction only once it has begun the one before, not one ahead (no "
            "cross-instruction prefetch of claimed weights)",
            {"policy": "queue", "build_flags": ("-DMK_CLAIM_AHEAD=0",)}),
        Row("policy=queue+MK_CLAIM_REC=0", "the global work queue, the consumers reading each "
            "claimed record from L2 at its head, not from the copy the loader left in shared "
            "memory", {"policy": "queue", "build_flags": ("-DMK_CLAIM_REC=0",)}),
        Row("lmhead_slices=4xSMs", f"{4 * num_sms} LM head slices (4 per SM, each a quarter "
            "of the default's), still queued statically", {"lmhead_slices": 4 * num_sms}),
        Row("claim_tail=lmhead", f"as lmhead_slices=4xSMs, with the {4 * num_sms} LMHEADs and "
            "the argmax claimed at run time (the SM that is free first takes the next)",
            {"lmhead_slices": 4 * num_sms, "claim_tail": "lmhead"}),
        flag("MK_CLAIMS", 1, "the claim code compiled in (what it costs the static plans; "
             "Decoder builds it for policy=queue and claim_tail)"),
        Row("granularity=layer", "one counter per stage and layer", {"granularity": "layer"}),
        Row("granularity=head", "one counter per head", {"granularity": "head"}),
        Row("attn_splits=4", "4 KV splits per (sequence, KV head)", {"attn_splits": 4}),
        Row("attn_splits=8", "8 KV splits per (sequence, KV head)", {"attn_splits": 8}),
        Row("attn_splits=32", "32 KV splits per (sequence, KV head)", {"attn_splits": 32}),
        Row("reduce_slices=1", "one ATTN_REDUCE per (sequence, KV head), not one per q head",
            {"reduce_slices": 1}),
        Row("fuse_reduce", "no ATTN_REDUCE stage: the last ATTN split of each (sequence, KV "
            "head) merges it", {"fuse_reduce": True}),
        Row("fuse_oproj=0", "ATTN_REDUCE and OPROJ stages, not ATTN_OPROJ (which merges a q "
            "head's dims and adds its O projection of a column slice into the residual "
            "atomically; the default at batch <= 7)", {"fuse_oproj": False}),
        Row("fuse_oproj=1", "ATTN_OPROJ where the default does not fuse (batch 8; with "
            "K-sliced DOWNs GATEUP stores the residual copies they and the next ATTN_OPROJ "
            "add onto)", {"fuse_oproj": True}),
        Row("fuse_oproj_rows", "fuse_oproj with whole rows (oproj_col_slices=1): each "
            "instruction a dim slice, 4x the atomic adds per residual element",
            {"oproj_col_slices": 1}),
        Row("half_sms", f"{num_sms // 2} of the {num_sms} SMs",
            {"num_sms": num_sms // 2}),
        Row("variant=default", "batch 1-2 run the build with the larger staging area and one "
            "ring slot less (csrc/megakernel.cu, not megakernel_b1.cu)",
            {"variant": "default"}),
        flag("MK_B1_STAGE_AHEAD", 0, "the batch-1 build's multi-chunk DOWN stages each "
             "activation chunk after the previous chunk's pages, not into registers during them"),
        flag("MK_NUM_PAGES", 2, "shallow shared-memory ring: 2 pages"),
        flag("MK_INFLIGHT_PAGES", 0, "no cap on the pages the loader keeps in flight "
             "(issued, not landed) off the attention chain: as many as the ring has free "
             "slots, not 2"),
        flag("MK_INFLIGHT_PAGES", 1, "at most 1 page in flight per SM off the attention "
             "chain too, not 2"),
        flag("MK_INFLIGHT_PAGES", 3, "at most 3 pages in flight per SM off the attention "
             "chain, not 2"),
        flag("MK_INPUT_LEAD", 3, "the loader prefetches an instruction's small inputs 3 "
             "instructions ahead of its page walk, not as the walk passes it"),
        flag("MK_INPUT_LEAD", 6, "the input prefetch 6 instructions (about a layer) ahead"),
        flag("MK_RAW_SLOT", 0, "batches on CUDA cores leave the tensor-core staging area "
             "idle: a 4-slot ring, not 5"),
        flag("MK_INPUT_PREFETCH", 0, "no L2 prefetch of the small inputs (queue, wait "
             "targets, norm weights, RoPE rows, KV cache): the consumers miss on demand"),
        flag("MK_PREFETCH_KV", 0, "the input prefetch leaves out the KV cache"),
        flag("MK_L2_PREFETCH_PAGES", 8, "L2 prefetch of the next 8 pages once the ring "
             "has stalled 2 us"),
        flag("MK_L2_PREFETCH_PAGES", 8, "L2 prefetch of the next 8 pages whenever the "
             "loader waits for a slot", "-DMK_L2_STALL_NS=0"),
        flag("MK_WARP_RELEASE", 1, "one arrival per consumer warp on a ring slot's empty "
             "barrier after a __syncwarp (8 per page instead of 256)"),
        flag("MK_WARP_ACC", 0, "CUDA-core matvec: warps sharing a row tile add into one "
             "shared accumulator with compare-and-swap loops, not their own copies"),
        flag("MK_COPY_KB", 64, "a page row in one bulk copy (up to 16 KB), not in 4 KB "
             "pieces"),
        flag("MK_MV_VEC4", 1, "CUDA-core matvec: four vectors' loads in flight per lane, not "
             "two (one shared-memory latency per page)"),
        flag("MK_ROW_TILE_B1", 4, "batch 1: row tiles of 4 on pages of 4+ rows (QKV, OPROJ, "
             "GATEUP, LMHEAD), not 2: half the activation reads (20 bytes of spills in the "
             "9-warp block, none under the warpgroups)"),
        flag("MK_MV_SCATTER", 0, "CUDA-core matvec: every sum of a tile reduced with its own "
             "5 shuffles, not one reduce-scatter"),
        Row("down_k_slices=1", "DOWN rows whole, not in K slices that add into the residual "
            "atomically (each stages the whole MLP activation; the default at batch <= 4)",
            {"down_k_slices": 1}),
        Row("down_k_slices=2", "DOWN rows in 2 K slices (where batch > 4 the default is "
            "plan.default_down_k_slices: 2 or 4 for 1B and 8B)", {"down_k_slices": 2}),
        Row("MK_FUSE_OPROJ=0", "fuse_oproj=0 in a kernel built without ATTN_OPROJ (what "
            "compiling it in costs the other plans)",
            {"fuse_oproj": False, "build_flags": ("-DMK_FUSE_OPROJ=0",)}),
        flag("MK_ATTN_TWICE", 1, "every ATTN and ATTN_REDUCE runs twice, the same outputs (a "
             "diagnostic: what one pass of them costs the step)"),
        flag("MK_TC_WARP_ACC", 0, "tensor-core matvec: pages flush into the shared accumulators "
             "with CAS-spin atomics, not into per-warp copies of them"),
        flag("MK_TC_SPLIT", 0, "tensor-core matvec: bf16 activations, one MMA a step, not hi + "
             "lo pairs and two (a diagnostic: what the second MMA costs; less precise)"),
        flag("MK_SETUP_FIRST", 0, "a matvec waits on its counters before it decodes and sets "
             "up (~1 us of serial code after the wait), not after"),
        flag("MK_RECORD_SMEM", 0, "every instruction reads its record from L2, not from "
             "the shared-memory copy warp 0 fills during the previous wait"),
        flag("MK_RELEASE_QUIET", 0, "the loader keeps issuing copies between a matvec's "
             "last page and its release, whose fence then waits for them"),
        flag("MK_RELEASE_QUIET", 2, "the loader pauses only from an instruction's outputs "
             "written to its release (not from a matvec's or ATTN_OPROJ's last page)"),
        flag("MK_QUIET_WAIT_NS", 1000, "the loader stays quiet past a release until the "
             "next instruction's wait has passed or 1 us, so an SM that finishes a stage last "
             "polls for the next without its own new copies ahead of the poll"),
        flag("MK_QUIET_WAIT_NS", 2000, "as MK_QUIET_WAIT_NS=1000, for 2 us at most"),
        flag("MK_QUIET_INPUTS", 1, "the loader issues nothing while ATTN / ATTN_REDUCE "
             "execute (their L2 loads do not queue behind landing pages)"),
        flag("MK_QUIET_INPUTS", 2, "as MK_QUIET_INPUTS=1, and during a CUDA-core matvec's "
             "activation staging too"),
        flag("MK_CHAIN_INFLIGHT", 0, "two pages in flight throughout, not one from QKV's "
             "start to GATEUP's wait and through DOWN's (the attention chain's hops and "
             "staging queue behind the SM's own pages in flight)"),
        flag("MK_CHAIN_QKV", 0, "the chain's one-page cap from ATTN's start, not QKV's"),
        flag("MK_CHAIN_DOWN", 0, "the chain's one-page cap not through DOWN's wait (the hop "
             "from the last GATEUP)"),
        flag("MK_ATTN_EXACT_G", 0, "ATTN unrolled for 8 q heads with an exit after the "
             "group's last, one head after the other, not exactly 4 heads interleaved where "
             "G == 4 (D 64, 128)"),
        # The partials hop is the unfused plan's, in a kernel without ATTN_OPROJ (whose
        # ATTN signals then need no release): compare these rows with MK_FUSE_OPROJ=0.
        Row("MK_LL_PARTIALS=1+MK_FUSE_OPROJ=0", "as MK_FUSE_OPROJ=0, and ATTN also stores its "
            "partials as flagged pairs and ATTN_REDUCE polls them, not the ATTN counters (no "
            "release, counter round trip or bar.sync between them)",
            {"fuse_oproj": False, "build_flags": ("-DMK_LL_PARTIALS=1", "-DMK_FUSE_OPROJ=0")}),
        flag("MK_LL_Q", 0, "ATTN waits on the QKV counters and reads q and the new k / v "
             "from their buffers, not polls the flagged pairs QKV also stores (the batch-1/2 "
             "build's default; the other build has it off)"),
        flag("MK_LL_Q", 1, "the flagged QKV -> ATTN hop in the batch-8 build too (the "
             "batch-1/2 build has it already: there this row is the default's code)"),
        flag("MK_LL_X", 1, "DOWN also stores the residual as flagged elements and QKV "
             "(layers >= 1) and LMHEAD poll them, not the DOWN counter (the batch-1/2 build, "
             "tp = 1: elsewhere this row is the default's code)"),
        flag("MK_LL_X", 1, "as MK_LL_X=1, the polls re-read at once instead of sleeping "
             "128 ns between sweeps", "-DMK_LL_X_SLEEP_NS=0"),
        flag("MK_WARPGROUPS", 0, "9 warps at 168 registers each (session 34's block), not 12 "
             "whose loader warpgroup gives its registers to the consumers (setmaxnreg 56 / "
             "224); the batch-1/2 build then also without MK_LL_PARTIALS, which spills there"),
        flag("MK_LL_PARTIALS", 0, "the batch-1/2 build's ATTN_OPROJ waits on the ATTN counters "
             "and reads the plain partials, not polls the flagged pairs ATTN also stores (its "
             "default; the other build has it off: there this row is the default's code)"),
        flag("MK_LL_PARTIALS", 1, "the flagged ATTN -> ATTN_OPROJ (ATTN_REDUCE) hop in the "
             "batch-8 build too (the batch-1/2 build has it already)"),
        flag("MK_B1_TC", 1, "the tensor-core matvec compiled into the batch-1/2 build (dead "
             "code at its batches that holds registers), and so MK_LL_Q off there (with it "
             "the build spills 8 bytes): that build's default up to session 32"),
        Row("MK_LL_Q=1+MK_LL_PARTIALS=1+MK_FUSE_OPROJ=0", "as MK_FUSE_OPROJ=0, and both hops "
            "flagged: QKV -> ATTN and ATTN -> ATTN_REDUCE",
            {"fuse_oproj": False,
             "build_flags": ("-DMK_LL_Q=1", "-DMK_LL_PARTIALS=1", "-DMK_FUSE_OPROJ=0")}),
        flag("MK_TC_MIN_BUCKET", 1, "tensor cores from batch 1 up (the hi/lo split "
             "activations as an 8-column n-tile)"),
        Row("no_waits", "every wait stripped (words 3..6 zeroed), static tokens", {},
            strip_waits=True, diagnostic=True),
        Row("no_compute", "consumers skip the math", {"ablate": ("no_compute",)},
            diagnostic=True),
        Row("no_load", "the loader skips the weight copies", {"ablate": ("no_load",)},
            diagnostic=True),
    ]


def select(rows: list[Row], names: str | None) -> list[Row]:
    """The rows named in a comma list (all when None), in grid order; the default row is
    always kept, first: it is what the others are compared with."""
    if names is None:
        return list(rows)
    wanted = [n.strip() for n in names.split(",") if n.strip()]
    known = [r.name for r in rows]
    unknown = [n for n in wanted if n not in known]
    if unknown or not wanted:
        raise ValueError(f"--rows {names!r}: unknown row(s) {unknown}; rows: {','.join(known)}")
    return [r for r in rows if r.name == BASELINE or r.name in wanted]


def runtime_kwargs(row: Row) -> dict:
    return {k: v if isinstance(v, str) else tuple(v) for k, v in row.kwargs.items()
            if k in RUNTIME_KEYS}


def plan_row(row: Row, cfg, batch: int, pos: int, num_sms: int, gpu):
    """The Program a row runs, planned with `gpu` (the device's GpuSpec) for position pos;
    its predicted_us is the cost model's step time of that Program."""
    from megakernel.scheduler import isa, plan, simulate
    options = {k: v for k, v in row.kwargs.items() if k not in RUNTIME_KEYS}
    options.setdefault("num_sms", num_sms)
    program = plan(cfg, batch=batch, gpu=gpu, kv_position=pos, **options)
    if not row.strip_waits:
        return program
    lo, hi = isa.HEADER.index("wait0_first"), isa.HEADER.index("wait1_count") + 1
    stripped = dataclasses.replace(program, instructions=program.instructions.copy(),
                                   claim=program.claim.copy())
    for records in (stripped.instructions, stripped.claim):
        records[..., lo:hi] = 0
    stripped.predicted_us = simulate(stripped, gpu).total_us
    return stripped


def ring_ms(row: Row, program, batch: int) -> float | None:
    """The ring model's step time (ms) of a row's Program with the ring its build has
    (scheduler/ring_model.py), or None where the model does not see the row's change (a
    build flag or ablation other than the ring's) or cannot run the Program (claims)."""
    from megakernel.scheduler.ring_model import RingModel, simulate_ring
    kw = runtime_kwargs(row)
    ring = RingModel.for_build(batch, kw.get("build_flags", ()), kw.get("ablate", ()),
                               kw.get("variant", "auto"))
    if ring is None or program.claim_len or program.tp != 1:
        return None
    return simulate_ring(program, ring).total_us / 1e3


def record(row: Row, **measured) -> dict:
    """A row's record; measured fields default to None (not measured)."""
    rec = {f: None for f in RECORD_FIELDS}
    rec.update(name=row.name, change=row.change, kwargs=row.kwargs, diagnostic=row.diagnostic,
               modelled=row.modelled, note="")
    rec.update(measured)
    return rec


def derive(run: dict) -> dict:
    """Fill each record's ratios to the default row and its bandwidth, in place."""
    base = next((r for r in run["records"] if r["name"] == BASELINE), {})
    for r in run["records"]:
        ms, pred = r["ms_per_step"], r["predicted_ms"]
        r["time_vs_default"] = _ratio(ms, base.get("ms_per_step"))
        r["predicted_vs_default"] = _ratio(pred, base.get("predicted_ms"))
        r["ring_vs_default"] = _ratio(r.get("ring_ms"), base.get("ring_ms"))
        tbps = run["bytes_read_per_step"] / (ms / 1e3) / 1e12 if ms else None
        r["achieved_TBps"] = tbps
        r["fraction_of_copy_bandwidth"] = _ratio(tbps, run["copy_TBps"])
    return run


def _ratio(a, b):
    return a / b if a is not None and b else None


def _ring(r: dict) -> str:
    if r.get("ring_ms") is None:
        return "-"
    ratio = r.get("ring_vs_default")
    return f"{r['ring_ms']:.3f}" + ("" if ratio is None else f" ({ratio:.2f})")


def _f(x, fmt: str) -> str:
    return "-" if x is None else format(x, fmt)


def markdown(run: dict) -> str:
    out = [f"# megakernel ablation: {run['model']} batch {run['batch']} on {run['gpu']}, "
           f"{run['date']}", "",
           f"torch {run['torch']} (CUDA {run['cuda']}), commit `{run['commit']}`, "
           f"{run['num_sms']} SMs. Position {run['position']}, median of {run['iters']} "
           f"CUDA-event-timed graph replays after {run['warmup']} warm-up, L2 flushed between "
           f"steps. Copy bandwidth in this run: {_f(run['copy_TBps'], '.2f')} TB/s. "
           f"Predictions: cost model `{run['cost_model']}`.", "",
           "| row | change | ms/step | time / default | predicted ms | predicted / default "
           "| ring model ms (/ default) | TB/s | of copy BW | logits vs default | setup s "
           "| note |",
           "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in run["records"]:
        mark = " (not modelled)" if not r["modelled"] and r["predicted_ms"] is not None else ""
        logits = _f(r["logits_rel_diff"], ".1e")
        if r["argmax_equal"] is False:
            logits += ", argmax differs"
        out.append(f"| {r['name']}{' †' if r['diagnostic'] else ''} | {r['change']} | "
                   f"{_f(r['ms_per_step'], '.3f')} | {_f(r['time_vs_default'], '.2f')} | "
                   f"{_f(r['predicted_ms'], '.3f')}{mark} | "
                   f"{_f(r['predicted_vs_default'], '.2f')} | {_ring(r)} | "
                   f"{_f(r['achieved_TBps'], '.2f')} | "
                   f"{_f(r['fraction_of_copy_bandwidth'], '.0%')} | {logits} | "
                   f"{_f(r['setup_s'], '.1f')} | {r['note']} |")
    out += ["", "† diagnostic: gives wrong results, timing only. (not modelled): the cost model "
            "sees only the plan, so the prediction is the default plan's. Ring model: the cost "
            "model with each SM's weight ring, loader and in-flight caps "
            "(scheduler/ring_model.py), for the rows whose change it sees (plans, ring depth, "
            "pages in flight, the chain cap, no_prefetch; '-' for the others).", "",
            "## Method", ""] + [f"- {line}" for line in run["method"]]
    if run["notes"]:
        out += ["", "## Notes", ""] + [f"- {line}" for line in run["notes"]]
    return "\n".join(out) + "\n"


def bar_chart(run: dict, path) -> Path:
    """One horizontal bar per row (measured ms/step, grey hatched when diagnostic), the cost
    model's prediction as a diamond (hollow when the model does not see the change), the
    default row's time as a dashed line. Rows without a time say why in place of a bar."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    recs = run["records"]
    fig, ax = plt.subplots(figsize=(9.0, 1.2 + 0.42 * len(recs)))
    top = max([r[k] or 0.0 for r in recs for k in ("ms_per_step", "predicted_ms")] + [1e-3])
    for y, r in enumerate(recs):
        ms = r["ms_per_step"]
        if ms is None:
            ax.text(0.01 * top, y, (r["note"] or "not measured")[:70], va="center", fontsize=7,
                    color="tab:red")
        else:
            ax.barh(y, ms, 0.7, color="0.75" if r["diagnostic"] else "tab:blue",
                    hatch="//" if r["diagnostic"] else None)
            ratio = f" ({r['time_vs_default']:.2f}x)" if r["time_vs_default"] else ""
            ax.text(max(ms, r["predicted_ms"] or 0.0) + 0.01 * top, y, f" {ms:.3f}{ratio}",
                    va="center", fontsize=7)
        if r["predicted_ms"] is not None:
            ax.plot(r["predicted_ms"], y, "D", color="black", markersize=5,
                    fillstyle="full" if r["modelled"] else "none")
    base = next((r["ms_per_step"] for r in recs if r["name"] == BASELINE), None)
    if base:
        ax.axvline(base, color="black", linestyle="--", linewidth=0.8)
    ax.set_yticks(range(len(recs)))
    ax.set_yticklabels([r["name"] + (" †" if r["diagnostic"] else "") for r in recs])
    ax.invert_yaxis()
    ax.set_xlim(0, 1.3 * top)
    ax.set_xlabel("ms per decode step (bars: measured; diamonds: cost model, hollow = "
                  "not modelled; † diagnostic)")
    ax.set_title(f"ablation: {run['model']} batch {run['batch']} on {run['gpu']}", fontsize=10)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def write_all(run: dict, out_dir, stem: str) -> tuple[list[Path], str | None]:
    """<out_dir>/<stem>.json, .md and (matplotlib permitting) .png."""
    return report.write_all(run, out_dir, stem, markdown_fn=markdown, chart_fn=bar_chart,
                            replot_hint="a machine with matplotlib (bench.ablate.bar_chart)")
