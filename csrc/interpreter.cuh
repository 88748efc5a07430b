// The persistent interpreter: one block per SM, all co-resident. Warps 0..7 consume this
// SM's instruction queue in order; warp 8 is the loader (matvec.cuh). Per instruction the
// consumers: wait on the counters of its wait ranges (acquire; watchdog on every wait),
// execute the op, then after a block barrier thread 0 publishes with a release add on the
// signal counter. Counters are monotonic: for epoch e the target of counter c is
// counter_targets[c] * (e + 1). The last block to finish a step advances the epoch.
// Tensor parallelism (tp > 1): one such grid per GPU, all resident at once. A record with
// all_ranks stores into every rank's buffers and bumps its signal counter on every rank
// with a system-scope release; every wait acquires at system scope. An error on one rank
// aborts the others (their records say ABORTED and name the rank that failed).
#pragma once
#include "common.cuh"
#include "loader.cuh"
#include "matvec.cuh"
#include "matvec_tc.cuh"
#include "ops/argmax.cuh"
#include "ops/attn.cuh"
#include "ops/attn_oproj.cuh"
#include "ops/attn_reduce.cuh"
#include "ops/embed.cuh"
#include "ops/gateup.cuh"
#include "ops/lmhead.cuh"
#include "ops/qkv.cuh"
#include "ops/residual.cuh"

namespace mk {

struct SmemLayout {
  static constexpr size_t pages = 0;
  // The tensor-core matvec's raw activation chunk (cp.async destinations) right after the
  // ring's slots: with kRawSlot, batches on CUDA cores use it as slot kNumPages.
  static constexpr size_t raw = pages + static_cast<size_t>(kNumPages) * kSlotBytes;
  // With kRawSlot at least a slot, where a small activation chunk (megakernel_b1.cu) is less.
  static constexpr size_t raw_bytes = kRawFloats * sizeof(float) > size_t{kSlotBytes} || !kRawSlot
                                          ? kRawFloats * sizeof(float) : size_t{kSlotBytes};
  static constexpr size_t full = raw + ((raw_bytes + 127) & ~size_t{127});
  static constexpr size_t empty = full + kMaxSlots * sizeof(uint64_t);
  static constexpr size_t act = empty + kMaxSlots * sizeof(uint64_t);
  static constexpr size_t acc = act + kActFloats * sizeof(float);
  static constexpr size_t red = acc + kAccFloats * sizeof(float);
  static constexpr size_t rstd = red + kConsumerWarps * kMaxBatch * sizeof(float);
  static constexpr size_t pos = rstd + kMaxBatch * sizeof(float);
  static constexpr size_t rec = pos + kMaxBatch * sizeof(int);
  static constexpr size_t flags = rec + 2 * kWords * sizeof(int32_t);
  // flags: wait ok, error, abort, ready, quiet, chain, quiet until (0-6), then the claims'
  // (Ring): started, nclaimed, the claim index of the consumers' current instruction, the
  // claim FIFO and (kClaimRec) its records.
  static constexpr int kChain = 5, kQuietUntil = 6;
  static constexpr int kStarted = 7, kNclaimed = 8, kClaimIndex = 9, kClaimq = 10;
  static constexpr int kClaimRecs = kClaimq + kClaimSlots;
  static constexpr int kFlags = kClaimRecs + (kClaims && kClaimRec ? kClaimSlots * kWords : 0);
  static constexpr size_t total = flags + kFlags * sizeof(int);
};
// The attention op reuses act + acc as its scratch.
static_assert((kActFloats + kAccFloats) >=
                  kConsumerWarps * kMaxG * (2 + kMaxD) + kMaxG * kMaxD + kMaxD,
              "attention scratch must fit in the activation + accumulator space");
static_assert(SmemLayout::total <= 227 * 1024, "shared memory budget of one H100 block");

// Stop the whole grid (every rank's under tp): first error wins the record.
__device__ void report_error(const KernelArgs& a, int code, int i, const int32_t* ins,
                             int counter, int value, int target) {
  if (atomicCAS(a.error, 0, code) == 0) {
    a.error[1] = blockIdx.x;
    a.error[2] = i;
    a.error[3] = ins[W_UID];
    a.error[4] = counter;
    a.error[5] = value;
    a.error[6] = target;
    a.error[7] = ins[W_OPCODE];
    __threadfence();
    for (int r = 0; r < a.tp; ++r) {
      if (r == a.rank) continue;
      int32_t* peer = a.peers[r].error;
      if (atomicCAS_system(peer, 0, ERR_ABORTED) == 0) {  // ABORTED, origin rank in word 1
        peer[1] = a.rank;
        __threadfence_system();
      }
    }
  }
}

// A flagged hop's producer (kLlPartials: ATTN, kLlQ: QKV) counts its signal without the
// release fence: its only waiter (ATTN_REDUCE or ATTN_OPROJ; ATTN) polls the flagged data
// instead, and the fence (~1 us for ATTN) held the SM's next instruction. Builds whose
// records may wait on those counters for unflagged data (fuse_reduce's OPROJ, fold) keep
// the release.
__device__ __forceinline__ bool relaxed_signal(int op) {
  return (kLlPartials && !kFuseReduce && op == OP_ATTN) ||
         (kLlQ && !MK_FOLD && op == OP_QKV);
}

__device__ __forceinline__ int32_t acquire_counter(const KernelArgs& a, const int32_t* p) {
  return a.tp > 1 ? ld_acquire_sys(p) : ld_acquire(p);
}

// Warp 0 of the consumers: true when every waited counter reached its target. Lane i polls
// the i-th, (i+32)-th, ... counter of the two ranges taken as one list, so a wait on up to 32
// counters costs one round trip to L2, not one per counter or per range (the stage after
// the attention block waits on a long-complete range too, lowering.py).
// first_only: the first range alone (a flagged reader's second range is its polled data's).
__device__ bool wait_counters(const KernelArgs& a, const int32_t* ins, int i, int epoch,
                              bool first_only = false) {
  static_assert(kNumWaits == 2, "wait_counters polls two ranges as one list");
  const int lane = threadIdx.x & 31;
  const int first0 = ins[W_WAIT0_FIRST], n0 = ins[W_WAIT0_COUNT];
  const int first1 = ins[W_WAIT1_FIRST], n = n0 + (first_only ? 0 : ins[W_WAIT1_COUNT]);
  for (int j0 = 0; j0 < n; j0 += 32) {
    const int j = j0 + lane;
    const bool mine = j < n;
    const int c = j < n0 ? first0 + j : first1 + (j - n0);
    const int32_t target = mine ? __ldg(a.counter_targets + c) * (epoch + 1) : 0;
    int32_t v = mine ? acquire_counter(a, a.counters + c) : 0;
    if (__all_sync(0xffffffffu, !mine || v - target >= 0)) continue;
    const uint64_t start = globaltimer();
    uint32_t spins = 0;
    bool done = !mine || v - target >= 0;
    while (!__all_sync(0xffffffffu, done)) {
      if (!done) done = (v = acquire_counter(a, a.counters + c)) - target >= 0;
      if ((++spins & 255) == 0) {
        const bool stop = ld_volatile(a.error) != ERR_NONE;
        const bool late = !done && static_cast<int64_t>(globaltimer() - start) > a.watchdog_ns;
        if (late) report_error(a, ERR_WATCHDOG, i, ins, c, v, target);
        if (__any_sync(0xffffffffu, stop || late)) return false;
      }
    }
  }
  return true;
}

// Warp 0 of the consumers, at claimed queue index i: take the loader's claim i - qlen from
// the FIFO (flags[kClaimIndex] <- its claim index, -1 when the list ran dry) and copy its
// record, which the loader left beside it (kClaimRec; else from L2), into rec[i % 2]. Not
// inlined: it keeps the consumers' loop out of the register spill.
__device__ __noinline__ void take_claim(const KernelArgs& a, volatile int* flags, int32_t* rec,
                                        int i, int qlen) {
  const int tid = threadIdx.x, j = i - qlen;
  int k = 0;
  if (tid == 0) {
    while (get_flag(flags + SmemLayout::kNclaimed) <= j) {}  // every claim, -1 too
    __threadfence_block();  // the count before the entry and record it publishes
    k = get_flag(flags + SmemLayout::kClaimq + j % kClaimSlots);
    flags[SmemLayout::kClaimIndex] = k;
  }
  k = __shfl_sync(0xffffffffu, k, 0);
  __syncwarp();                 // the lanes' reads of the record after thread 0's wait
  if (k >= 0 && tid < kWords)  // Ring::claimrec, or L2
    rec[(i & 1) * kWords + tid] =
        kClaimRec ? get_flag(flags + SmemLayout::kClaimRecs + (j % kClaimSlots) * kWords + tid)
                  : a.claim[static_cast<size_t>(k) * kWords + tid];
}

// The timing build: thread 0's row of KernelArgs::timing for the current instruction (a
// register pointer kept across the consumers' loop spilled at the 168-register cap).
__shared__ int64_t* timing_row;

// kTiming: record (wait start, wait end, end, outputs written) %globaltimer stamps of every
// instruction (end: after the release add; written: before it, after the last bar.sync); a
// compile-time switch, so the kernel without it carries no timing code at all. Inlined into
// the kernel: the ops read its parameters from the constant bank, not through a pointer.
template <bool kTiming>
__device__ __forceinline__ void consumer_main(const KernelArgs& a, const Ring& ring,
                                              const int32_t* queue, int qlen, int epoch,
                                              unsigned char* smem) {
  const int tid = threadIdx.x;
  float* act = reinterpret_cast<float*>(smem + SmemLayout::act);
  float* acc = reinterpret_cast<float*>(smem + SmemLayout::acc);
  float* red = reinterpret_cast<float*>(smem + SmemLayout::red);
  float* rstd = reinterpret_cast<float*>(smem + SmemLayout::rstd);
  volatile int* flags = reinterpret_cast<volatile int*>(smem + SmemLayout::flags);
  int* pos = reinterpret_cast<int*>(smem + SmemLayout::pos);
  // Positions are fixed for the launch: one read here, not one L2 round trip per op. The
  // bar.sync after the first instruction's wait publishes them to every consumer.
  if (tid < a.B) pos[tid] = a.pos[tid];
  // kRecordSmem: instruction i's record is read from a shared-memory copy, rec[i % 2], which
  // warp 0 fills while it waits on instruction i-1's counters: no L2 round trip for the
  // record at the head of every instruction. The queue is read-only for the launch.
  int32_t* rec = reinterpret_cast<int32_t*>(smem + SmemLayout::rec);
  float* raw = reinterpret_cast<float*>(smem + SmemLayout::raw);
  if (kRecordSmem && tid < kWords && qlen > 0) rec[tid] = queue[tid];
  __syncwarp();
  // kSetupFirst reads the record (and QKV's setup pos) before an instruction's first bar.sync.
  if (kSetupFirst) consumer_sync();
  uint32_t it = 0;
  for (int i = 0;; ++i) {
    // Ring::started: the loader may now claim queue index i + kClaimAhead.
    if (kClaims && a.claim_len > 0 && tid == 0) set_flag(flags + SmemLayout::kStarted, i);
    if (i >= qlen) {
      // A claimed instruction: its record comes from the loader's claim (not prefetched
      // during the previous wait: the loader claims it about now); the bar.sync publishes
      // it and flags[kClaimIndex]. The other copy's record (i - 1) is done with.
      if (!kClaims || a.claim_len == 0) break;
      if (tid < 32) take_claim(a, flags, rec, i, qlen);
      consumer_sync();
      if (flags[SmemLayout::kClaimIndex] < 0) break;  // the claim list ran dry
    }
    const int32_t* ins = kRecordSmem || i >= qlen ? rec + (i & 1) * kWords
                                                  : queue + static_cast<size_t>(i) * kWords;
    // kChainInflight: the loader narrows its window from a chain instruction's start, its
    // wait included (thread 0 has the record: warp 0 wrote it before a __syncwarp, or a
    // bar.sync of instruction i-1 published it), until an off-chain one has passed its wait.
    if (kChainInflight && tid == 0 && chain_cap_op(ins[W_OPCODE])) set_flag(ring.chain, 1);
    // Warp 0: the counter wait of instruction i (and the copy of record i+1). The bar.sync
    // after it orders every consumer after its acquires; flags[0] says how it went.
    auto wait = [&]() {
      if (tid < 32) {
        const bool more = kRecordSmem && tid < kWords && i + 1 < qlen;
        const int32_t next = more ? queue[static_cast<size_t>(i + 1) * kWords + tid] : 0;
        const uint64_t t0 = kTiming ? globaltimer() : 0;
        // kLlPartials / kLlQ / kLlX: ATTN_REDUCE / ATTN / QKV and LMHEAD (x_ll_input) poll
        // their inputs' tags instead; ATTN_OPROJ polls its partials after waiting on its
        // first range (the residual's writer, lowering.py) alone.
        const int op = ins[W_OPCODE];
        const bool ok = (kLlPartials && op == OP_ATTN_REDUCE) || (kLlQ && op == OP_ATTN) ||
                        (kLlX && x_ll_input(a, ins) != nullptr) ||
                        wait_counters(a, ins, i, epoch, kLlPartials && op == OP_ATTN_OPROJ);
        if (tid == 0) {
          flags[0] = ok ? 1 : 0;
          if (kChainInflight && !chain_op(ins[W_OPCODE])) set_flag(ring.chain, 0);
          if (kQuietWaitNs) set_flag(ring.quiet, 0);  // the release's quiet (2) ends here
          if (kTiming) {
            timing_row = a.timing + (static_cast<size_t>(blockIdx.x) * a.timing_len + i) * 4;
            timing_row[0] = t0;
            timing_row[1] = globaltimer();
          }
#if MK_PHASE_STAMPS
          phase_row = kTiming && a.phase_timing
                          ? a.phase_timing + (static_cast<size_t>(blockIdx.x) * a.timing_len + i) * 4
                          : nullptr;
#endif
        }
        // The other copy held instruction i-1's record: thread 0 read it last, at i-1's
        // release (the __syncwarp orders that before these stores); the bar.syncs of
        // instruction i publish the new record to every consumer.
        __syncwarp();
        if (more) rec[((i + 1) & 1) * kWords + tid] = next;
        // waits of instruction i hold (the NO_PREFETCH loader waits for it)
        if (tid == 0 && ok) flags[3] = i;
      }
    };
    // kSetupFirst: a matvec runs its setup (decode, geometry, accumulators: ~1 us of serial
    // code) first and its wait right before the bar.sync that precedes its first activation
    // load; everything else waits here. Record i was published by instruction i-1's last
    // bar.sync (i = 0: the launch's).
    const bool setup_first = kSetupFirst && is_matvec(ins[W_OPCODE]);
    if (!setup_first) {
      wait();
      consumer_sync();
      if (kStageStamps) phase_stamp(3);  // every consumer past the wait's bar.sync
      if (!flags[0]) break;
    }
    int err = ERR_NONE;
    const int op = ins[W_OPCODE];
    if (kQuietInputs && tid == 0 && (op == OP_ATTN || op == OP_ATTN_REDUCE))
      set_flag(ring.quiet, 1);  // cleared after the release
    if (is_matvec(op) && !matvec_valid(a, ins)) {
      err = ERR_BAD_INSTRUCTION;
    } else if (is_matvec(op)) {
      // Buckets below kTcMinBucket run on CUDA cores; the CUDA-core code of the others is
      // compiled only when MK_TC_MIN_BUCKET leaves them on CUDA cores.
      const int nt = tc_ntiles(a.B);
      PreLoad pre_src;  // epilogue inputs loaded with the first chunk (PreLoad)
      const bool adds = op == OP_DOWN && ins[W_DOWN_KN];  // a K slice: no residual entry
      if ((op == OP_OPROJ || (op == OP_DOWN && !adds)) && tid < ins[W_OPROJ_NROWS] * a.B)
        pre_src.x = ResidualOp::residual_in(a, ins, tid);
      else if (op == OP_QKV)
        pre_src = QkvOp::rope_src(a, ins, pos);
      else if (op == OP_GATEUP && ins[W_GATEUP_COPY] && tid < ins[W_GATEUP_SUM_NCOLS] * a.B)
        pre_src.x = GateUpOp::copy_src(a, ins, tid);
      float2 pre = make_float2(0.f, 0.f);
#define MK_MATVEC(f, n) \
  f<n, kTiming>(a, ring, ins, it, act, acc, red, rstd, pre_src, wait, flags, setup_first, epoch)
#define MK_MATVEC_TC(n) \
  consumer_matvec_tc<n, kTiming>(a, ring, ins, it, act, acc, red, rstd, pre_src, raw, wait, \
                                 flags, setup_first)
      if (kTcCompiled && nt == 1) pre = MK_MATVEC_TC(1);
      else if (kTcCompiled && nt == 2) pre = MK_MATVEC_TC(2);
      else if (a.B == 1) pre = MK_MATVEC(consumer_matvec, 1);
      else if (a.B == 2) pre = MK_MATVEC(consumer_matvec, 2);
      else if (kTcMinBucket > 4 && a.B <= 4) pre = MK_MATVEC(consumer_matvec, 4);
      else if (kTcMinBucket > 8 && a.B <= 8) pre = MK_MATVEC(consumer_matvec, 8);
      else if (kTcMinBucket > 16) pre = MK_MATVEC(consumer_matvec, 16);
#undef MK_MATVEC
#undef MK_MATVEC_TC
      if (setup_first && !flags[0]) break;  // its wait failed (after the chunk's bar.sync)
      switch (op) {
        case OP_QKV: err = QkvOp::epilogue(a, ins, acc, pos, pre, epoch); break;
        case OP_GATEUP: err = GateUpOp::epilogue(a, ins, acc, pre.x); break;
        case OP_LMHEAD: err = LmHeadOp::epilogue(a, ins, acc, red); break;
        default: err = ResidualOp::epilogue(a, ins, acc, pre.x, epoch); break;  // OPROJ, DOWN
      }
    } else {
      switch (op) {
        case OP_EMBED: err = EmbedOp::run(a, ins); break;
        case OP_ATTN:
          err = AttnOp::run(a, ins, act, pos, epoch);
          if (kAttnTwice && err == ERR_NONE) {
            consumer_sync();  // every warp done with the first run's scratch
            err = AttnOp::run(a, ins, act, pos, epoch);
          }
          if (ins[W_ATTN_MERGE] && err == ERR_NONE) {  // Runtime refuses these without the flag
            if constexpr (kFuseReduce) {
              AttnOp::merge_if_last(a, ins, reinterpret_cast<volatile int*>(act), epoch);
            } else {
              err = ERR_BAD_INSTRUCTION;
            }
          }
          break;
        case OP_ATTN_REDUCE:
          err = AttnReduceOp::run(a, ins, epoch);
          if (kAttnTwice && err == ERR_NONE) {
            consumer_sync();
            err = AttnReduceOp::run(a, ins, epoch);
          }
          break;
        case OP_ATTN_OPROJ:  // Runtime refuses these without the flag
          if constexpr (kFuseOproj) {
            if (!AttnOprojOp::valid(a, ins)) { err = ERR_BAD_INSTRUCTION; break; }
#define MK_ATTN_OPROJ(n) AttnOprojOp::run<n, kTiming>(a, ring, ins, it, acc, act, epoch)
            if (a.B == 1) err = MK_ATTN_OPROJ(1);
            else if (a.B == 2) err = MK_ATTN_OPROJ(2);
            else if (a.B <= 4) err = MK_ATTN_OPROJ(4);
            else err = MK_ATTN_OPROJ(8);
#undef MK_ATTN_OPROJ
          } else {
            err = ERR_BAD_INSTRUCTION;
          }
          break;
        case OP_ARGMAX: err = ArgmaxOp::run(a, ins); break;
        case OP_RESID_SUM: err = ResidSumOp::run(a, ins); break;
        default: err = ERR_BAD_OPCODE; break;
      }
    }
    if (err != ERR_NONE) { flags[1] = err; }
    if (kReleaseQuiet && tid == 0) set_flag(ring.quiet, 1);  // no loads until the release
    consumer_sync();  // every output of the instruction is written
    if (flags[1] != ERR_NONE) {
      if (tid == 0) report_error(a, flags[1], i, ins, -1, 0, 0);
      break;
    }
    if (tid == 0) {
      if (kTiming) timing_row[3] = globaltimer();
      const int sig = ins[W_SIGNAL];
      // The bar.sync above ordered every consumer's writes before this thread; the release
      // add publishes them (cumulativity) to whoever acquires the counter.
      if (sig >= 0 && ins[W_ALL_RANKS] && !(a.mode & MODE_LOCAL_COMM)) {
        for (int r = 0; r < a.tp; ++r) red_release_add_sys(a.peers[r].counters + sig, 1);
      } else if (sig >= 0 && relaxed_signal(ins[W_OPCODE])) {
        red_relaxed_add(a.counters + sig, 1);
      } else if (sig >= 0) {
        red_release_add(a.counters + sig, 1);
      }
      if (kTiming) timing_row[2] = globaltimer();
      if (kQuietWaitNs) {  // quiet on through the next wait, for kQuietWaitNs at most
        set_flag(ring.quiet_until, static_cast<int>(static_cast<uint32_t>(globaltimer()) +
                                                    static_cast<uint32_t>(kQuietWaitNs)));
        __threadfence_block();  // the deadline before the state that makes the loader read it
        set_flag(ring.quiet, 2);
      } else if (kReleaseQuiet) {
        set_flag(ring.quiet, 0);
      }
    }
  }
  if (tid == 0) ring.abort[0] = 1;  // harmless after a full run: the loader has finished
}

template <bool kTiming>
__global__ void __launch_bounds__(kThreads, 1) megakernel(const __grid_constant__ KernelArgs a) {
  extern __shared__ __align__(128) unsigned char smem[];
  Ring ring;
  ring.pages = smem + SmemLayout::pages;
  ring.slots = tc_ntiles(a.B) ? kRingSlots<true> : kRingSlots<false>;
  ring.full = reinterpret_cast<uint64_t*>(smem + SmemLayout::full);
  ring.empty = reinterpret_cast<uint64_t*>(smem + SmemLayout::empty);
  volatile int* flags = reinterpret_cast<volatile int*>(smem + SmemLayout::flags);
  ring.abort = flags + 2;
  ring.ready = flags + 3;
  ring.quiet = flags + 4;
  ring.chain = flags + SmemLayout::kChain;
  ring.quiet_until = flags + SmemLayout::kQuietUntil;
  ring.started = flags + SmemLayout::kStarted;
  ring.nclaimed = flags + SmemLayout::kNclaimed;
  ring.claimq = flags + SmemLayout::kClaimq;
  ring.claimrec = flags + SmemLayout::kClaimRecs;
  if (threadIdx.x == 0) {
    for (int s = 0; s < kMaxSlots; ++s) {
      mbar_init(&ring.full[s], 1);
      mbar_init(&ring.empty[s], kEmptyArrivals);
    }
    flags[0] = 0;
    flags[1] = ERR_NONE;
    flags[2] = 0;
    flags[3] = -1;
    flags[4] = 0;
    if (kChainInflight) flags[SmemLayout::kChain] = 0;
    if (kQuietWaitNs) flags[SmemLayout::kQuietUntil] = 0;
    if (kClaims) {
      flags[SmemLayout::kStarted] = -1;
      flags[SmemLayout::kNclaimed] = 0;
    }
    fence_mbar_init();
  }
  __syncthreads();
  const int epoch = a.epoch[0];
  const int32_t* queue = a.instructions + static_cast<size_t>(blockIdx.x) * a.max_len * kWords;
  const int qlen = a.queue_len[blockIdx.x];
  if (kWarpgroups) {
    // Each side ends in the same named barrier (consumers + the loader warp) and never runs
    // code of the other's register budget: the loader returns from its own branch.
    if (threadIdx.x >= kConsumerThreads) {
      asm volatile("setmaxnreg.dec.sync.aligned.u32 %0;" :: "n"(kLoaderRegs));
      if (threadIdx.x >= kConsumerThreads + 32) return;  // the warpgroup's idle warps
      loader_main<kTiming>(a, ring, queue, qlen);
      asm volatile("bar.sync 2, %0;" :: "n"(kConsumerThreads + 32) : "memory");
      return;
    }
    asm volatile("setmaxnreg.inc.sync.aligned.u32 %0;" :: "n"(kConsumerRegs));
    consumer_main<kTiming>(a, ring, queue, qlen, epoch, smem);
    asm volatile("bar.sync 2, %0;" :: "n"(kConsumerThreads + 32) : "memory");
  } else {
    if (threadIdx.x >= kConsumerThreads) {
      loader_main<kTiming>(a, ring, queue, qlen);
    } else {
      consumer_main<kTiming>(a, ring, queue, qlen, epoch, smem);
    }
    __syncthreads();
  }
  if (threadIdx.x == 0 && a.counts_step && ld_volatile(a.error) == ERR_NONE) {
    __threadfence();
    const int old = atomicAdd(a.done, 1);
    if (old == static_cast<int>(gridDim.x) * (epoch + 1) - 1) {
      if (kClaims && a.claim_next) *a.claim_next = 0;  // every loader has stopped claiming
      atomicExch(a.epoch, epoch + 1);
    }
  }
}

}  // namespace mk
