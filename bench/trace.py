"""One traced megakernel step, made readable: the kernel's timing array (calibration.Measured)
-> Chrome/Perfetto trace JSON, a Gantt PNG, and a per-opcode table of measured against
predicted time; with the ring's page stamps, the ring model's constants as the trace gives
them (ring_constants, stage_spread). Also the .npz a trace is kept in, so all of it can be
redone offline (`python -m megakernel trace --from-npz`). numpy only (matplotlib for the PNG).

Trace JSON: process 0, one thread (track) per SM named "SM s"; every instruction is a
complete event named by its opcode from wait end to end, args uid / layer / its record's
fields / MB moved; the wait before it is its own "wait" event. Times are microseconds since
the step's first wait start.

Everything here reads per-SM arrays by (SM, queue index), so a program with claims
(Program.claim) is passed as program.as_executed(claimed), the queues its SMs ran that step;
the functions that take the program refuse one with claims.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from megakernel.scheduler import isa
from megakernel.scheduler.calibration import Measured
from megakernel.scheduler.cost import instruction_us
from megakernel.scheduler.table import NUM_ARGS

WAIT_NAME = "wait"


def chrome_trace(m: Measured, title: str) -> dict:
    t = m.table
    events = [{"ph": "M", "name": "process_name", "pid": 0, "args": {"name": title}}]
    for s in sorted(set(t.sm.tolist())):
        events.append({"ph": "M", "name": "thread_name", "pid": 0, "tid": s,
                       "args": {"name": f"SM {s}"}})
        events.append({"ph": "M", "name": "thread_sort_index", "pid": 0, "tid": s,
                       "args": {"sort_index": s}})
    names = {int(op): op.name for op in isa.Op}
    fields = {int(op): isa.ARGS[op] for op in isa.Op}
    rows = zip(t.sm.tolist(), t.op.tolist(), t.uid.tolist(), t.layer.tolist(), t.args.tolist(),
               t.waits.tolist(), m.t0.tolist(), m.t1.tolist(), m.t2.tolist(), m.nbytes.tolist())
    for sm, op, uid, layer, args, waits, t0, t1, t2, nbytes in rows:
        if t1 > t0:
            ranges = [f"[{waits[k]}, {waits[k] + waits[k + 1]})"
                      for k in range(0, len(waits), 2) if waits[k + 1]]
            events.append({"ph": "X", "name": WAIT_NAME, "cname": "grey", "pid": 0, "tid": sm,
                           "ts": round(t0, 3), "dur": round(t1 - t0, 3),
                           "args": {"uid": uid, "counters": " ".join(ranges)}})
        info = {"uid": uid, "layer": layer, "MB": round(nbytes / 1e6, 4)}
        info.update(zip(fields[op], args[:NUM_ARGS]))
        events.append({"ph": "X", "name": names[op], "pid": 0, "tid": sm, "ts": round(t1, 3),
                       "dur": round(t2 - t1, 3), "args": info})
    return {"traceEvents": events, "displayTimeUnit": "ns"}


def write_chrome_trace(path, m: Measured, title: str) -> Path:
    path = Path(path)
    path.write_text(json.dumps(chrome_trace(m, title)))
    return path


def gantt(path, m: Measured, title: str) -> Path:
    """A PNG with one row per SM: instructions coloured by opcode, waits in grey."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:
        raise RuntimeError("matplotlib is not installed, so no Gantt PNG; redo it elsewhere "
                           "with `python -m megakernel trace --from-npz trace.npz`") from e
    from matplotlib.collections import PolyCollection
    t = m.table
    num_sms = int(t.sm.max()) + 1 if len(t) else 1
    fig, ax = plt.subplots(figsize=(16, max(4.0, 0.06 * num_sms + 1.5)))

    def bars(sel, x0, x1, color, label):      # one rectangle per selected instruction
        y, a, b = t.sm[sel], x0[sel], x1[sel]
        verts = np.stack([np.stack([a, y - 0.45], 1), np.stack([b, y - 0.45], 1),
                          np.stack([b, y + 0.45], 1), np.stack([a, y + 0.45], 1)], 1)
        ax.add_collection(PolyCollection(verts, facecolors=color, linewidths=0, label=label))

    for k, op in enumerate(isa.Op):
        if (t.op == op).any():
            bars(t.op == op, m.t1, m.t2, plt.get_cmap("tab10")(k % 10), op.name)
    bars(m.t1 > m.t0, m.t0, m.t1, "0.85", WAIT_NAME)
    ax.set_xlabel("microseconds since the step's first instruction")
    ax.set_ylabel("SM")
    ax.set_ylim(num_sms - 0.5, -0.5)
    ax.set_xlim(0, m.t2.max(initial=1.0))
    ax.set_title(title)
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.08), ncol=6, frameon=False)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def opcode_table(program, m: Measured, specs: dict) -> str:
    """Per opcode: count, SM-us waiting and occupied, mean measured occupancy next to the
    mean predicted instruction time under each GpuSpec in `specs` (label -> spec), MB moved
    and the bandwidth one SM achieved while occupied (bytes / occupancy)."""
    t = m.table
    occ = m.occupancy_us()
    pred = {label: instruction_us(t, program.config, program.batch, program.attn_splits,
                                  program.lm_slices, spec, program.num_sms,
                                  program.options["kv_position"])
            for label, spec in specs.items()}
    head = (f"{'opcode':<12}{'count':>7}{'wait SM-us':>12}{'busy SM-us':>12}"
            f"{'measured us':>13}" + "".join(f"{'pred ' + k:>18}" for k in pred)
            + f"{'MB':>10}{'GB/s/SM':>9}")
    lines = [head]

    def row(name, sel):
        busy = occ[sel].sum()
        cells = "".join(f"{p[sel].mean():>18.2f}" for p in pred.values())
        lines.append(f"{name:<12}{int(sel.sum()):>7}{m.wait_us[sel].sum():>12.1f}{busy:>12.1f}"
                     f"{occ[sel].mean():>13.2f}{cells}{m.nbytes[sel].sum() / 1e6:>10.2f}"
                     f"{m.nbytes[sel].sum() / max(busy, 1e-9) / 1e3:>9.1f}")
    for op in isa.Op:
        if (t.op == op).any():
            row(op.name, t.op == op)
    row("all", np.ones(len(t), bool))
    span = m.span_us
    lines.append(f"step span {span:.1f} us over {program.num_sms} SMs: "
                 f"{m.nbytes.sum() / 1e6:.1f} MB moved -> "
                 f"{m.nbytes.sum() / max(span, 1e-9) / 1e6:.3f} TB/s; "
                 f"SMs busy {occ.sum() / (span * program.num_sms):.0%}, waiting "
                 f"{m.wait_us.sum() / (span * program.num_sms):.0%} of SM time")
    return "\n".join(lines)


def _pages_by_instruction(program, timing: np.ndarray, pages: np.ndarray):
    """Per SM with stamped pages: (sm, page indices, their instruction's queue index). A page
    belongs to the instruction whose execution (timing's wait end .. end) holds its consumer
    wait end (stamp 2)."""
    for sm, n in enumerate(program.queue_len):
        got = pages[sm, :, 2]
        k = np.flatnonzero(got > 0)
        if not len(k) or not n:
            continue
        idx = np.searchsorted(timing[sm, :n, 1], got[k], "right") - 1
        inside = (idx >= 0) & (got[k] <= timing[sm, np.maximum(idx, 0), 2])
        yield sm, k[inside], idx[inside]


def page_table(program, timing: np.ndarray, pages: np.ndarray) -> str:
    """Per matvec opcode, from the timing build's ring-page stamps (`pages` [num_sms, n, 4+]
    ns: loader issue, consumer warp 0 wait start, wait end, done; KernelArgs::page_timing):
    pages stamped, then medians in us of warp 0's wait for a loaded page (wait end - start),
    its time on the page (done - wait end), the loader's lead (wait end - issue: where warp
    0 waited, the copy's latency), and the interval from one page's done to the next of the
    same instruction (the consumers' page rate); then the share of pages warp 0 waited for
    (over 50 ns) and the median lead of those: how long a copy took when it mattered. A page
    belongs to the instruction whose execution (timing's wait end .. end) holds its wait end."""
    program.require_static("trace.page_table")
    rows = {}
    for sm, k, idx in _pages_by_instruction(program, timing, pages):
        p = pages[sm, k].astype(np.float64) / 1e3
        same = np.r_[False, idx[1:] == idx[:-1]]
        interval = np.r_[np.nan, np.diff(p[:, 3])]
        for op in np.unique(program.instructions[sm, idx, 0]):
            sel = program.instructions[sm, idx, 0] == op
            r = rows.setdefault(int(op), [[], [], [], []])
            r[0].append(p[sel, 2] - p[sel, 1])
            r[1].append(p[sel, 3] - p[sel, 2])
            r[2].append(p[sel, 2] - p[sel, 0])
            r[3].append(interval[sel & same])
    head = (f"{'opcode':<12}{'pages':>8}{'wait us':>9}{'page us':>9}{'lead us':>9}"
            f"{'interval us':>13}{'waited':>8}{'latency us':>12}"
            "   (medians per ring page, consumer warp 0)")
    lines = [head]
    for op in sorted(rows):
        w, c, lead, iv = (np.concatenate(x) for x in rows[op])
        waited = w > 0.05
        lines.append(f"{isa.Op(op).name:<12}{len(w):>8}{np.median(w):>9.2f}{np.median(c):>9.2f}"
                     f"{np.median(lead):>9.2f}"
                     f"{np.median(iv) if len(iv) else float('nan'):>13.2f}"
                     f"{waited.mean():>8.0%}"
                     f"{np.median(lead[waited]) if waited.any() else float('nan'):>12.2f}")
    return "\n".join(lines)


def issue_timeline(program, timing: np.ndarray, pages: np.ndarray, page_bytes: int = 32768,
                   bin_us: float = 2.0, span_us: tuple[float, float] = (-4.0, 60.0)) -> str:
    """Where in a layer the HBM idles: ring pages issued (stamp 0, all SMs) per us, in bins
    of `bin_us` from the previous layer's last DOWN end, the mean over the layers that have
    one before and after (of those, the first and last left out where more than four), the
    rate counting every page as `page_bytes` (the kernel's MK_PAGE_KB; short pages are
    fewer). A stretch well under the copy bandwidth while pages are still to stream is HBM
    idle (bench/NOTES.md, session 22). Then the pages/us of each opcode whose pages the
    consumers took (_pages_by_instruction; pages no consumer stamped are in the total only):
    whose pages stream where, e.g. the next QKV's at the DOWN's end (session 23)."""
    program.require_static("trace.issue_timeline")
    ops, layer = program.instructions[..., 0], program.instructions[..., 1]
    live = np.arange(program.instructions.shape[1])[None] < program.queue_len[:, None]
    down = live & (ops == int(isa.Op.DOWN))
    layers = sorted(set(layer[down].tolist()))
    ends = {l: timing[..., 2][down & (layer == l)].max() for l in layers}
    inner = [l for l in layers if l - 1 in ends and l + 1 in ends]
    if len(inner) > 4:
        inner = inner[1:-1]
    issued = pages[..., 0][pages[..., 0] > 0].astype(np.float64)
    edges = np.arange(span_us[0], span_us[1] + bin_us / 2, bin_us)
    if not inner or not len(issued):
        return "no layer with ring pages on both sides to show"
    def rates(t):  # pages/us per bin, the mean over the inner layers
        return np.mean([np.histogram((t - ends[l - 1]) / 1e3, edges)[0] for l in inner],
                       axis=0) / bin_us
    by_op = {}
    for sm, k, idx in _pages_by_instruction(program, timing, pages):
        for op, t in zip(program.instructions[sm, idx, 0], pages[sm, k, 0]):
            by_op.setdefault(int(op), []).append(t)
    ops_seen = sorted(o for o in by_op if o in isa.Op._value2member_map_)
    total = rates(issued)
    per_op = [rates(np.asarray(by_op[o], np.float64)) for o in ops_seen]
    lines = [f"{'us after DOWN':>14}{'pages/us':>10}{'TB/s':>7}"
             + "".join(f"{isa.Op(o).name:>11}" for o in ops_seen)
             + f"   (ring pages issued, mean of layers {inner[0]}-{inner[-1]}, "
             f"{page_bytes // 1024} KB a page; then pages/us by opcode)"]
    for j, lo in enumerate(edges[:-1]):
        lines.append(f"{lo:>14.0f}{total[j]:>10.1f}{total[j] * page_bytes / 1e6:>7.2f}"
                     + "".join(f"{r[j]:>11.1f}" for r in per_op))
    return "\n".join(lines)


def ring_constants(program, timing: np.ndarray, pages: np.ndarray, spec) -> dict:
    """The ring model's per-instruction constants (scheduler/ring_model.py, GpuSpec ring_*)
    as this trace's page stamps give them, medians in us: `ring_page_us` (the consumers'
    time on a page: done - wait end), `ring_head_us` (a matvec's time outside its pages:
    wait end -> its first page's wait start, plus its last page's done -> end; LMHEAD, the
    one-off epilogue, left out), `ring_attn_us` (ATTN's whole time) and `ring_merge_us`
    (ATTN_REDUCE's; with none, ATTN_OPROJ's time outside its pages less ring_head_us). Each is
    net of what the model charges on top: its non-weight bytes at the SM's share of `spec`'s
    bandwidth and `spec.ring_queue_us` per own copy in flight when its wait ended (issued, not
    yet landed by the model's rule: ring_mem_latency_us after its issue, a page's bytes at the
    share after the page ahead). Keys with no instruction to measure are
    left out; `instructions` counts the measured ones."""
    from megakernel.scheduler.cost import instruction_bytes_flops
    from megakernel.scheduler.ring_model import PAGE_BYTES, _weight_bytes, landing
    program.require_static("trace.ring_constants")
    t = program.table()
    nbytes, _ = instruction_bytes_flops(t, program.config, program.batch, program.attn_splits,
                                        program.lm_slices, spec, program.options["kv_position"])
    rate = spec.sm_bytes_per_s(program.num_sms) / 1e6          # bytes per us
    wbytes = _weight_bytes(t, program.config, spec.weight_bytes)
    extra = np.maximum(nbytes - wbytes, 0) / rate
    row = {(int(s), int(i)): k for k, (s, i) in enumerate(zip(t.sm, t.index))}
    outside = np.full(len(t), np.nan)      # matvecs: time outside their pages
    page_us = []
    page_bytes = np.full(pages.shape[:2], float(PAGE_BYTES))   # its instruction's share
    for sm, k, idx in _pages_by_instruction(program, timing, pages):
        p = pages[sm, k].astype(np.float64) / 1e3
        page_us.append(p[:, 3] - p[:, 2])
        for q in np.unique(idx):
            mine = p[idx == q]
            outside[row[sm, int(q)]] = (mine[0, 1] - timing[sm, q, 1] / 1e3
                                        + timing[sm, q, 2] / 1e3 - mine[-1, 3])
            page_bytes[sm, k[idx == q]] = wbytes[row[sm, int(q)]] / len(mine)
    # the model's landing times (ring_model.landing) of the stamped issues
    issued = pages[..., 0].astype(np.float64) / 1e3
    land = np.full(issued.shape, -np.inf)
    for sm in range(program.num_sms):
        prev = None
        for k in np.flatnonzero(issued[sm] > 0):
            prev = land[sm, k] = landing(issued[sm, k], issued[sm, k] if prev is None else prev,
                                         page_bytes[sm, k] / rate, spec.ring_mem_latency_us)
    we = timing[t.sm, t.index, 1] / 1e3
    n = np.array([np.count_nonzero((issued[s] <= w) & (land[s] > w)) for s, w in zip(t.sm, we)])
    whole = timing[t.sm, t.index, 2] / 1e3 - we
    net = np.where(np.isnan(outside), whole, outside) - extra - spec.ring_queue_us * n
    op = t.op
    got = {"instructions": 0}

    def put(key, sel, minus=0.0):
        if sel.any():
            got[key] = float(np.median(net[sel])) - minus
            got["instructions"] += int(sel.sum())
    if page_us:
        got["ring_page_us_tc" if program.batch >= 3 else "ring_page_us"] = float(
            np.median(np.concatenate(page_us)))
    put("ring_head_us", ~np.isnan(outside) & np.isin(op, [isa.Op.QKV, isa.Op.OPROJ,
                                                          isa.Op.GATEUP, isa.Op.DOWN]))
    put("ring_attn_us", op == isa.Op.ATTN)
    if (op == isa.Op.ATTN_REDUCE).any():
        put("ring_merge_us", op == isa.Op.ATTN_REDUCE)
    else:
        put("ring_merge_us", ~np.isnan(outside) & (op == isa.Op.ATTN_OPROJ),
            got.get("ring_head_us", spec.ring_head_us))
    return got


def stage_spread(program, timing: np.ndarray, min_count: int = 8) -> float | None:
    """The ring model's ring_spread_us as this trace gives it: per stage (an opcode's
    instructions of one layer, at least `min_count` of them), how far the last end is past
    the median end, in units of ring_model.straggle(count) (the expected maximum of that
    many normal draws); the median over stages, us. None with no such stage."""
    from megakernel.scheduler.ring_model import straggle
    program.require_static("trace.stage_spread")
    t = program.table()
    end = timing[t.sm, t.index, 2] / 1e3
    got = []
    for key in np.unique(np.stack([t.op, t.layer], 1), axis=0):
        e = end[(t.op == key[0]) & (t.layer == key[1])]
        if len(e) >= min_count:
            got.append((e.max() - np.median(e)) / float(straggle(len(e))))
    return float(np.median(got)) if got else None


# The loader's own stamps of a ring page (KernelArgs::page_timing, csrc/loader.cuh): the
# intervals between them, in the order the loader passes them.
LOADER_STEPS = (("slot", 7, 4), ("cap", 4, 5), ("quiet", 5, 0), ("issue", 0, 6))


def loader_table(program, timing: np.ndarray, pages: np.ndarray) -> str | None:
    """Per opcode of the page being loaded, from the loader's stamps (`pages` with 8 columns;
    None for older traces with 4): pages, then the mean us per page the loader spent waiting
    for the page's slot to be freed by the consumers (reached -> slot free), for the page
    `cap` pages back to land (the in-flight cap), for a release to finish (MK_RELEASE_QUIET),
    issuing its copies, and walking to it from the page before (the walk's geometry and the
    input prefetches: previous copies issued -> reached); then the share of pages whose slot
    and cap waits took over 50 ns. The means add up to the loader's time per page."""
    program.require_static("trace.loader_table")
    if pages.shape[-1] < 8:
        return None
    rows = {}
    for sm, k, idx in _pages_by_instruction(program, timing, pages):
        p = pages[sm].astype(np.float64) / 1e3
        prev = np.where(k > 0, p[np.maximum(k - 1, 0), 6], np.nan)
        steps = [p[k, b] - p[k, a] for _, a, b in LOADER_STEPS] + [p[k, 7] - prev]
        for op in np.unique(program.instructions[sm, idx, 0]):
            sel = program.instructions[sm, idx, 0] == op
            r = rows.setdefault(int(op), [[] for _ in steps])
            for lst, x in zip(r, steps):
                lst.append(x[sel])
    head = (f"{'opcode':<12}{'pages':>8}" + "".join(f"{n + ' us':>10}" for n, _, _ in LOADER_STEPS)
            + f"{'walk us':>10}{'slot>0':>8}{'cap>0':>8}   (loader, mean per ring page)")
    lines = [head]
    for op in sorted(rows):
        cols = [np.concatenate(x) for x in rows[op]]
        lines.append(f"{isa.Op(op).name:<12}{len(cols[0]):>8}"
                     + "".join(f"{np.nanmean(c) if np.isfinite(c).any() else float('nan'):>10.2f}"
                               for c in cols)
                     + f"{(cols[0] > 0.05).mean():>8.0%}{(cols[1] > 0.05).mean():>8.0%}")
    return "\n".join(lines)


# What phase k (0..3) of each op marks: the phase_stamp calls in csrc (ops/attn.cuh,
# ops/attn_reduce.cuh, matvec.cuh, matvec_tc.cuh); "-": not stamped.
PHASES = {
    "ATTN": ("queries staged", "warp 0 positions done", "states merged", "outputs stored"),
    "ATTN_REDUCE": ("partials loaded", "merged+stored", "-", "-"),
    "ATTN_OPROJ": ("partials loaded", "merged", "first page done", "adds issued"),
    "matvec": ("inputs staged", "first page done", "last page done", "acc complete"),
}


def phase_table(program, timing: np.ndarray, phases: np.ndarray) -> str:
    """Per opcode, from the stamps ops take inside an instruction (`phases` [num_sms, len, 4]
    ns, a -DMK_PHASE_STAMPS=1 timing build; 0: not stamped): the median us from the wait's
    end to each phase and to the outputs written (timing column 3), over the instructions
    that stamped it, and what each phase marks (PHASES)."""
    program.require_static("trace.phase_table")
    t = program.table()
    s = timing[t.sm, t.index].astype(np.int64)
    ph = phases[t.sm, t.index].astype(np.int64)
    lines = [f"{'opcode':<12}{'count':>7}" + "".join(f"{'phase ' + str(k):>10}" for k in range(4))
             + f"{'written':>10}   (median us after the wait's end)"]
    for op in isa.Op:
        sel = (t.op == op) & (ph > 0).any(axis=1)
        if not sel.any():
            continue
        cells = []
        for k in range(4):
            got = sel & (ph[:, k] > 0)
            cells.append(f"{np.median(ph[got, k] - s[got, 1]) / 1e3:>10.2f}" if got.any()
                         else f"{'-':>10}")
        done = np.median(s[sel, 3] - s[sel, 1]) / 1e3
        marks = PHASES.get(op.name, PHASES["matvec"] if op in isa.MATVEC_OPS else ())
        lines.append(f"{op.name:<12}{int(sel.sum()):>7}{''.join(cells)}{done:>10.2f}   "
                     + ", ".join(m for m in marks if m != "-"))
    return "\n".join(lines)


def release_line(program, timing: np.ndarray) -> str | None:
    """Per opcode, the median us from an instruction's outputs written (its last bar.sync)
    to its end (after the release add that publishes them): the release's own cost. None for
    a 3-stamp timing array (kept before the stamp existed)."""
    program.require_static("trace.release_line")
    if timing.shape[2] < 4:
        return None
    t = program.table()
    s = timing[t.sm, t.index].astype(np.int64)
    cells = [f"{isa.Op(op).name} {np.median(s[t.op == op, 2] - s[t.op == op, 3]) / 1e3:.2f}"
             for op in isa.Op if (t.op == op).any()]
    return "release (end - outputs written), median us: " + ", ".join(cells)


LATE_BINS = (-1.0, -0.25)   # us: the previous instruction ended >= 1 us, 0.25-1 us, < 0.25 us
#                             before the last signaller of what the instruction waits on


def straggler_table(m: Measured, min_count: int = 8) -> str:
    """Who passes a stage's wait late (bench/NOTES.md, session 38). Per opcode, over its
    stages (one layer's instructions, at least `min_count`): how far the last end lies past
    the median end, and the median lag of an instruction's wait end behind its stage's
    median wait end, by how late its SM's previous instruction ended relative to the last
    signaller of what it waits on (LATE_BINS; an SM still busy then is in no bin): a stage's
    stragglers are the previous stage's when the late bin lags most."""
    t = m.table
    key = t.op.astype(np.int64) * 100_000 + t.layer
    lag = np.full(len(t), np.nan)
    tail = {}
    for k in np.unique(key):
        sel = key == k
        if sel.sum() >= min_count and k // 100_000 != isa.Op.NOP:   # older plans padded
            lag[sel] = m.t1[sel] - np.median(m.t1[sel])
            tail.setdefault(int(k // 100_000), []).append(m.t2[sel].max() - np.median(m.t2[sel]))
    before = m.prev_end - m.ready    # nan where it waits on nothing; > 0: its SM was busy
    late = np.where(before <= 0, np.digitize(before, LATE_BINS), -1)
    names = (">=1 us before", "0.25-1 us before", "last 0.25 us")
    lines = [f"{'opcode':<12}{'last end':>10}" + "".join(f"{n:>22}" for n in names)
             + "   (us past the stage's median; by when the SM's previous instruction ended)"]
    for op in sorted(tail):
        cells = []
        for b in range(len(names)):
            sel = (t.op == op) & np.isfinite(lag) & (late == b)
            cells.append(f"{np.median(lag[sel]):+.2f} ({int(sel.sum())})" if sel.any() else "-")
        lines.append(f"{isa.Op(op).name:<12}{np.mean(tail[op]):>10.2f}"
                     + "".join(f"{c:>22}" for c in cells))
    return "\n".join(lines)


def save_npz(path, timing: np.ndarray, program, meta: dict, pages=None, phases=None) -> Path:
    """Keep a traced step: the timing array, the program's queues and `meta` (JSON: what
    re-planning the same program needs, and the measured times); `pages`: the ring-page
    stamps, when recorded (load_pages); `phases`: the ops' phase stamps, kept when any was
    taken (load_phases)."""
    program.require_static("trace.save_npz")
    path = Path(path)
    extra = {}
    if phases is not None and (np.asarray(phases) != 0).any():
        extra["phases"] = np.asarray(phases, np.int64)
    if pages is not None:
        used = np.flatnonzero((np.asarray(pages) != 0).any(axis=(0, 2)))
        extra["pages"] = np.asarray(pages, np.int64)[:, :used[-1] + 1 if len(used) else 0]
    np.savez_compressed(path, timing=np.asarray(timing, np.int64),
                        instructions=program.instructions, queue_len=program.queue_len,
                        meta=np.array(json.dumps(meta)), **extra)
    return path


def load_pages(path) -> np.ndarray | None:
    """The ring-page stamps of a kept trace, or None where it has none."""
    with np.load(path) as z:
        return z["pages"] if "pages" in z.files else None


def load_phases(path) -> np.ndarray | None:
    """The ops' phase stamps of a kept trace, or None where it has none."""
    with np.load(path) as z:
        return z["phases"] if "phases" in z.files else None


def load_npz(path) -> tuple[np.ndarray, np.ndarray, np.ndarray, dict | None]:
    """-> (timing, instructions, queue_len, meta; None for a bare dump without it)."""
    with np.load(path) as z:
        meta = json.loads(str(z["meta"])) if "meta" in z.files else None
        return z["timing"], z["instructions"], z["queue_len"], meta
