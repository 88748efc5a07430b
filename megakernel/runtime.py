"""Runtime: binds a Program, packed weights and Buffers to the CUDA extension and launches.

Plan once, run many: the constructor allocates every buffer, copies the Program to the
device and freezes the kernel argument struct in a C++ Launcher; `launch()` is one kernel
launch on the current stream (no Python work, capturable in a CUDA graph). `check()`
synchronises and turns a kernel error record (watchdog, bad token, ...) into a RuntimeError.

Under tensor parallelism a Runtime is one rank's (program = that rank's Program); the
Launcher needs the other ranks' buffers, so megakernel.tp.TpRuntime builds the ranks first
and then calls `connect()` on each.
"""
from __future__ import annotations

import os

import numpy as np

import torch

from .buffers import SYNC_STATE, Buffers
from .packing import PackedWeights, add_wo_t
from .profiling import nvtx_range
from .scheduler import isa
from .scheduler.isa import Err, Op

SUPPORTED_HEAD_DIMS = (32, 64, 128)
MAX_GQA = 8
MAX_BATCH = 16
DEFAULT_WATCHDOG_MS = 2000
PAGE_TIMING_MAX = 8192   # ring pages per SM the timing build stamps (llama-3.1-8b: ~3.8k)
PAGE_STAMPS = 8          # per page: csrc/kernel_args.h kPageStamps (bench/trace.py reads them)
_ERRORS = {Err.WATCHDOG: "watchdog: a counter wait exceeded its budget",
           Err.BAD_OPCODE: "unknown opcode", Err.BAD_TOKEN: "token id out of range",
           Err.BAD_POSITION: "position outside the KV cache", Err.ABORTED: "aborted",
           Err.BAD_INSTRUCTION: "malformed instruction (rows * batch over the kernel's "
                                "capacity, an odd row pair slice, a DOWN K slice not of "
                                f"whole {isa.DOWN_K_ALIGN}-column units inside I, or a "
                                "residual copy to a level or range that does not exist)"}


def check_supported(cfg, batch: int) -> None:
    """Raise ValueError if the kernel cannot run this config/batch, saying what to change."""
    problems = []
    if cfg.D not in SUPPORTED_HEAD_DIMS:
        problems.append(f"head_dim {cfg.D} (supported: {SUPPORTED_HEAD_DIMS})")
    if cfg.G > MAX_GQA:
        problems.append(f"{cfg.G} query heads per kv head (at most {MAX_GQA})")
    for name, v in (("hidden_size", cfg.d), ("intermediate_size", cfg.I)):
        if v % 8:
            problems.append(f"{name} {v} (must be a multiple of 8 for 16-byte weight rows)")
    if not 1 <= batch <= MAX_BATCH:
        problems.append(f"batch {batch} (1..{MAX_BATCH})")
    if problems:
        raise ValueError(f"the megakernel does not support {cfg.name}: " + "; ".join(problems))


MODES = {"no_prefetch": 1, "no_compute": 2, "no_load": 4}   # csrc/kernel_args.h Mode
MODE_LOCAL_COMM = 8                                           # set by connect(phases=...)
# Plan options whose records only a kernel built with a flag executes (the default build
# leaves their code out: each cost the plain path ~1% when compiled in).
OPTION_FLAGS = {
    "fold": ("-DMK_FOLD=1", "its QKV/GATEUP/LMHEAD records sum the tp partials"),
    "fuse_reduce": ("-DMK_FUSE_REDUCE=1", "its ATTN records merge their groups"),
}
# Plan options whose code the default build has, and a flag leaves out.
OPTION_FLAGS_OFF = {
    "fuse_oproj": ("-DMK_FUSE_OPROJ=0", "its ATTN_OPROJ records merge and project the "
                   "attention output in one stage"),
}


# Programs with claimed records (policy "queue", option claim_tail) run on a kernel with the
# claim code, which the default build leaves out (csrc/common.cuh MK_CLAIMS).
CLAIMS_FLAG = "-DMK_CLAIMS=1"


def option_build_flags(program) -> tuple[str, ...]:
    """The build flags `program`'s plan options need (OPTION_FLAGS, and CLAIMS_FLAG where it
    has claims); a TpProgram's ranks share their options."""
    first = getattr(program, "ranks", [program])[0]
    flags = [flag for option, (flag, _) in OPTION_FLAGS.items() if first.options.get(option)]
    return tuple(flags + [CLAIMS_FLAG] * bool(first.claim_len))


def load_extension(verbose: bool = False, build_flags: tuple[str, ...] = ()):
    """The compiled extension: the pip-installed one, else a JIT build cached by a hash of the
    sources and flags. build_flags (e.g. "-DMK_NUM_PAGES=5") always take the JIT path."""
    if not build_flags and os.environ.get("MEGAKERNEL_JIT", "0") != "1":
        try:
            from . import _C  # type: ignore[attr-defined]
            return _C
        except ImportError:
            pass
    from torch.utils.cpp_extension import load

    from . import _build
    name = f"megakernel_{_build.source_hash(build_flags)}"
    root = os.environ.get("MEGAKERNEL_CACHE_DIR", os.path.expanduser("~/.cache/megakernel"))
    build_dir = os.path.join(root, name)
    os.makedirs(build_dir, exist_ok=True)
    with nvtx_range("megakernel.build"):
        return load(name=name, sources=[os.path.join(_build.ROOT, s) for s in _build.SOURCES],
                    extra_cuda_cflags=_build.NVCC_FLAGS + list(build_flags),
                    extra_cflags=_build.CXX_FLAGS,
                    extra_include_paths=[_build.CSRC], build_directory=build_dir,
                    verbose=verbose)


VARIANTS = ("auto", "default", "b1")
_ROWS_WORD = {op: len(isa.HEADER) + isa.ARGS[op].index("nrows")
              for op in (Op.QKV, Op.OPROJ, Op.GATEUP, Op.DOWN, Op.LMHEAD)}
_NDIMS_WORD = len(isa.HEADER) + isa.ARGS[Op.ATTN_OPROJ].index("ndims")


def accumulator_floats(program) -> int:
    """The most fp32 accumulators one instruction of `program` needs in shared memory: a
    matvec's rows x batch, an ATTN_OPROJ's dims x batch (the kernel's kAccFloats bound)."""
    ins = program.instructions
    live = np.arange(ins.shape[1])[None] < np.asarray(program.queue_len)[:, None]
    rec = np.concatenate([ins[live], program.claim])   # every record, static and claimed
    need = [rec[:, w][rec[:, 0] == int(op)] for op, w in _ROWS_WORD.items()]
    need.append(rec[:, _NDIMS_WORD][rec[:, 0] == int(Op.ATTN_OPROJ)])
    return int(max((int(n.max()) for n in need if n.size), default=0)) * program.batch


def b1_misfit(program, limits: dict) -> str | None:
    """Why the batch-1/2 build (csrc/megakernel_b1.cu; limits: the extension's b1_limits())
    cannot run `program`, or None where it can."""
    cfg = program.config
    if program.tp != 1:
        return "it runs one GPU's program (tp = 1)"
    if program.batch > limits["max_batch"]:
        return f"it takes batches up to {limits['max_batch']}, not {program.batch}"
    if cfg.H > limits["max_group"] * cfg.Hkv:
        return f"it takes groups of up to {limits['max_group']} q heads, not {cfg.H // cfg.Hkv}"
    need = accumulator_floats(program)
    if need > limits["acc_floats"]:
        return f"an instruction needs {need} accumulators, it has {limits['acc_floats']}"
    return None


def choose_variant(program, requested: str, limits: dict) -> str:
    """The build a Runtime launches: requested ("auto", "default" or "b1"; VARIANTS) against
    the b1 build's limits (the extension's b1_limits()). "b1" where the program does not fit
    it is a ValueError naming why."""
    if requested not in VARIANTS:
        raise ValueError(f"variant must be one of {VARIANTS}, got {requested!r}")
    if requested == "default":
        return "default"
    misfit = b1_misfit(program, limits)
    if requested == "b1" and misfit:
        raise ValueError(f"variant='b1' cannot run this Program: {misfit}")
    if requested == "auto" and misfit:
        return "default"
    return "b1"


class Runtime:
    def __init__(self, packed: PackedWeights, program, max_seq: int, timing: bool = False,
                 watchdog_ms: float | None = None, ablate: tuple[str, ...] = (),
                 build_flags: tuple[str, ...] = (), variant: str = "auto"):
        """ablate: names from MODES (switches that turn one overlap mechanism off; no_compute
        and no_load give wrong results and exist to time one half of the pipeline).
        build_flags: extra nvcc flags, e.g. ring geometry -DMK_NUM_PAGES=5.
        variant: which build of the interpreter runs (choose_variant): "b1" the batch-1/2
        layout with one more ring slot (an error where the program does not fit it,
        b1_misfit), "default" the other, "auto" b1 wherever it fits."""
        if hasattr(program, "ranks"):
            raise TypeError("Runtime runs one rank's Program; a TpProgram runs through "
                            "megakernel.tp.TpRuntime (or Decoder(..., tp=N))")
        cfg = program.config
        check_supported(cfg, program.batch)
        device = packed.device
        if device.type != "cuda":
            raise ValueError(f"Runtime needs packed weights on a CUDA device, got {device}")
        if packed.dtype != torch.bfloat16:
            raise ValueError(f"the kernel reads bf16 weights, got {packed.dtype}")
        props = torch.cuda.get_device_properties(device)
        if (props.major, props.minor) != (9, 0):
            raise RuntimeError(f"the megakernel is built for sm_90a (H100/H200); {props.name} is "
                               f"sm_{props.major}{props.minor}")
        if program.num_sms > props.multi_processor_count:
            raise ValueError(f"the Program was planned for {program.num_sms} SMs, {props.name} has "
                             f"{props.multi_processor_count}; plan with num_sms <= that")
        unknown = set(ablate) - set(MODES)
        if unknown:
            raise ValueError(f"unknown ablation switches {sorted(unknown)}; known: {sorted(MODES)}")
        options = getattr(program, "options", {})
        for option, (flag, what) in OPTION_FLAGS.items():
            if options.get(option) and flag not in build_flags:
                raise ValueError(f"the Program was planned with {option}=True: {what}, which "
                                 f"only a kernel built with {flag} does (Decoder adds it; pass "
                                 "it in build_flags)")
        for option, (flag, what) in OPTION_FLAGS_OFF.items():
            if options.get(option) and flag in build_flags:
                raise ValueError(f"the Program was planned with {option}=True: {what}, which "
                                 f"a kernel built with {flag} does not do (plan with "
                                 f"{option}=False)")
        if program.claim_len and CLAIMS_FLAG not in build_flags:
            raise ValueError(f"the Program has claimed instructions (policy 'queue', "
                             f"claim_tail), which only a kernel built with {CLAIMS_FLAG} runs "
                             "(Decoder adds it; pass it in build_flags)")
        if "no_load" in ablate and not any(f.startswith("-DMK_RAW_SLOT") for f in build_flags):
            # no_load times a 4-slot ring: with the raw slot (the default's 5th, batches on
            # CUDA cores) that diagnostic hung at llama-3.2-1b batch 1, positions 300 and 512.
            # Not understood yet; bench/NOTES.md, session 9.
            build_flags = (*build_flags, "-DMK_RAW_SLOT=0")
        self.ext = load_extension(build_flags=tuple(build_flags))
        b1_limits = self.ext.b1_limits()
        self.variant = choose_variant(program, variant, b1_limits)
        # Whether this build's ATTN polls the flagged q / k / v pairs QKV writes (MK_LL_Q):
        # whoever hands an ATTN its inputs by hand (op tests) flags them then.
        self.ll_q = bool(self.ext.ll_q_compiled(self.variant == "b1"))
        # Whether ATTN_REDUCE / ATTN_OPROJ poll ATTN's partials as flagged pairs
        # (MK_LL_PARTIALS; the batch-1/2 build's default): op tests flag theirs then.
        self.ll_partials = bool(self.ext.ll_partials_compiled(self.variant == "b1"))
        # Whether QKV (layers >= 1) and LMHEAD poll the residual DOWN writes as flagged
        # elements (MK_LL_X; tp = 1, batches on CUDA cores): only a DOWN of whole rows writes
        # them, so K-sliced DOWNs would leave those polls waiting.
        self.ll_x = bool(self.ext.ll_x_compiled(self.variant == "b1"))
        k_slices = getattr(program, "options", {}).get("down_k_slices") or 1
        if self.ll_x and k_slices > 1:
            raise ValueError(f"the Program was planned with down_k_slices={k_slices}: its DOWNs "
                             "add K slices onto GATEUP's copy of the residual, and a -DMK_LL_X=1 "
                             "kernel's QKV / LMHEAD poll the residual a DOWN of whole rows "
                             "writes (plan with down_k_slices=1)")
        limits = b1_limits if self.variant == "b1" else {
            "max_blocks_per_sm": self.ext.max_blocks_per_sm(), "smem_bytes": self.ext.smem_bytes()}
        if limits["max_blocks_per_sm"] < 1:
            raise RuntimeError(f"the interpreter block ({self.variant} build) does not fit on "
                               f"one SM ({limits['smem_bytes']} bytes of shared memory)")
        self.program, self.config, self.device, self.max_seq = program, cfg, device, max_seq
        with nvtx_range("megakernel.load"):
            self._bind(packed, program, max_seq, timing, watchdog_ms, ablate)

    def _bind(self, packed, program, max_seq, timing, watchdog_ms, ablate) -> None:
        """Allocate the buffers, upload the Program, freeze the kernel arguments."""
        cfg, device = program.config, packed.device
        if getattr(program, "options", {}).get("fuse_oproj") and packed.wo_t is None:
            packed = add_wo_t(packed)   # ATTN_OPROJ streams the O projection transposed
        self.buffers = Buffers.allocate(cfg, program, max_seq, device=device,
                                        kv_dtype=torch.bfloat16)
        self.buffers.poison()
        self.reset()

        dev = self._dev
        self._program_tensors = {
            "instructions": dev(program.instructions), "queue_len": dev(program.queue_len),
            # never empty: the kernel binds a pointer even when no counter exists
            "counter_targets": dev(program.counter_targets if program.num_counters else [0])}
        if program.num_counters == 0:
            self.buffers.counters = torch.zeros(1, dtype=torch.int32, device=device)
        claim = program.claim
        if len(claim):
            if program.tp > 1:
                raise ValueError("claimed instructions (policy 'queue', claim_tail) need tp = 1")
            self._program_tensors["claim"] = dev(claim)
        if timing and program.tp > 1:
            raise ValueError("timing=True is not supported under tensor parallelism (tp > 1)")
        # Per instruction: wait start, wait end, end, outputs written (before the release);
        # an SM's claimed instructions follow its static queue (timing_len rows).
        timing_len = int(program.instructions.shape[1]) + len(claim)
        self.timing = (torch.zeros(program.num_sms, timing_len, 4,
                                   dtype=torch.int64, device=device) if timing else None)
        # Timing builds: which claim each SM took, in order (-1 after its last): the trace
        # rebuilds the queues as executed from it (Program.as_executed).
        self.claimed = (torch.full((program.num_sms, len(claim)), -1, dtype=torch.int32,
                                   device=device) if timing and len(claim) else None)
        # Per ring page (ns): loader issue, consumer warp 0 wait start, wait end, done, then
        # the loader's slot free, cap passed, copies issued, page reached (KernelArgs).
        self.page_timing = (torch.zeros(program.num_sms, PAGE_TIMING_MAX, PAGE_STAMPS,
                                        dtype=torch.int64, device=device) if timing else None)
        # Per instruction: up to 4 stamps the op takes inside it (csrc/common.cuh phase_stamp;
        # only a kernel built with -DMK_PHASE_STAMPS=1 writes them; 0: not stamped).
        self.phase_timing = (torch.zeros_like(self.timing) if timing else None)
        watchdog_ms = watchdog_ms or float(os.environ.get("MEGAKERNEL_WATCHDOG_MS",
                                                          DEFAULT_WATCHDOG_MS))
        tensors = {**self.buffers.tensors(), **self._program_tensors,
                   "embed": packed.embed, "lm_head": packed.lm_head,
                   "final_norm": packed.final_norm, "attn_norm": packed.attn_norm,
                   "mlp_norm": packed.mlp_norm, "wqkv": packed.wqkv, "wo": packed.wo,
                   "wgu": packed.wgu, "wdown": packed.wdown, "wo_t": packed.wo_t,
                   "timing": self.timing, "claimed": self.claimed,
                   "page_timing": self.page_timing, "phase_timing": self.phase_timing}
        sizes = dict(max_len=int(program.instructions.shape[1]), claim_len=len(claim),
                     page_max=PAGE_TIMING_MAX,
                     B=program.batch, d=cfg.d, I=cfg.I,
                     L=cfg.L, H=cfg.H, Hkv=cfg.Hkv, D=cfg.D, V=cfg.V, S=max_seq,
                     NS=program.attn_splits, NLM=program.lm_slices,
                     num_counters=max(1, program.num_counters), eps=float(cfg.rms_norm_eps),
                     watchdog_ns=int(watchdog_ms * 1e6),
                     mode=sum(MODES[m] for m in set(ablate)), tp=program.tp,
                     rank=program.rank, vocab0=int(packed.vocab0), counts_step=1,
                     variant=int(self.variant == "b1"))
        self._tensors, self._sizes = tensors, sizes
        self._launchers = [self.ext.Launcher(tensors, sizes, program.num_sms)] \
            if program.tp == 1 else []

    def claim_map(self) -> np.ndarray:
        """The last launch's claims (a timing Runtime of a Program with claims): row s the
        claim indices SM s took, in order, then -1, as Program.as_executed takes them. What
        the row holds past the kernel's -1 (its dry claim) is an earlier launch's: masked."""
        if self.claimed is None:
            raise ValueError("claim_map() needs timing=True and a Program with claims")
        c = self.claimed.cpu().numpy()
        return np.where(np.cumsum(c < 0, axis=1) > 0, -1, c)

    def peer_tensors(self) -> dict:
        """The buffers other ranks store into and signal (csrc/kernel_args.h PeerBuffers)."""
        b = self.buffers
        return {"part": b.part, "logits": b.logits, "amax_val": b.amax_val,
                "amax_idx": b.amax_idx, "counters": b.counters, "error": b.error}

    def connect(self, peers: list[dict], phases=None) -> None:
        """tp > 1: build the launcher(s) given every rank's peer_tensors() (rank order).
        phases: None for in-kernel communication (one launch per step), else this rank's
        phase Programs (scheduler.phases), one launch each with all-rank stores and signals
        kept local (MODE_LOCAL_COMM); only the last one counts the step."""
        if self.program.tp == 1:
            raise ValueError("connect() is for tensor-parallel ranks")
        if phases is None:
            self._launchers = [self.ext.Launcher(self._tensors, self._sizes,
                                                 self.program.num_sms, peers)]
            return
        self._launchers = []
        for k, ph in enumerate(phases):    # the Launcher keeps its tensors alive
            prog = {"instructions": self._dev(ph.instructions),
                    "queue_len": self._dev(ph.queue_len),
                    "counter_targets": self._dev(ph.counter_targets)}
            sizes = dict(self._sizes, max_len=int(ph.instructions.shape[1]),
                         mode=self._sizes["mode"] | MODE_LOCAL_COMM,
                         counts_step=int(k == len(phases) - 1))
            self._launchers.append(self.ext.Launcher({**self._tensors, **prog}, sizes,
                                                     self.program.num_sms, peers))

    def _dev(self, a) -> torch.Tensor:
        return torch.as_tensor(a).to(device=self.device, dtype=torch.int32).contiguous()

    @property
    def num_launches(self) -> int:
        """Kernel launches per step (1, or the number of phases of the NCCL ablation)."""
        return len(self._launchers)

    def launch(self, phase: int = 0) -> None:
        """One decode step of the Program over the current buffers (async, capturable); with
        phases, phase `phase` of it."""
        if not self._launchers:
            raise RuntimeError("tensor-parallel rank not connected: build it through TpRuntime")
        self._launchers[phase].launch()

    def error(self) -> str | None:
        """Synchronise; the kernel's error report as text, or None."""
        torch.cuda.synchronize(self.device)
        rec = self.buffers.error.tolist()
        if rec[0] == 0:
            return None
        code, sm, index, uid, counter, value, target, op = rec
        gpu = (f" on rank {self.program.rank} ({self.device})" if self.program.tp > 1 else "")
        if code == Err.ABORTED and self.program.tp > 1:
            return f"megakernel{gpu}: aborted because rank {sm} reported an error"
        what = _ERRORS.get(code, f"error code {code}")
        try:
            op_name = Op(op).name
        except ValueError:
            op_name = f"opcode {op}"
        msg = (f"megakernel {what}{gpu}: SM {sm}, instruction {index} (uid {uid}, {op_name})")
        if code == Err.WATCHDOG and counter < 0:
            msg += (" waited for flagged inputs that never came (the tags of q_ll / kv_ll or "
                    "part_ll, a -DMK_LL_Q=1 or -DMK_LL_PARTIALS=1 build)")
        elif code == Err.WATCHDOG:
            msg += (f" waited on counter {counter}: value {value}, needed {target}. A counter "
                    "that never completes means a broken Program (validate it) or a step that "
                    "runs longer than MEGAKERNEL_WATCHDOG_MS")
        return msg

    def check(self) -> None:
        """Raise RuntimeError if the last launches reported an error; the synchronisation
        state is reset first, so the next valid run works."""
        msg = self.error()
        if msg is not None:
            self.reset_sync()
            raise RuntimeError(msg)

    def reset_sync(self) -> None:
        for name in SYNC_STATE:
            getattr(self.buffers, name).zero_()

    def reset(self) -> None:
        self.buffers.reset()
        self.buffers.pos.zero_()
