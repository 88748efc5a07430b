// Device primitives of the interpreter: release/acquire counters, the watchdog clock,
// mbarriers and bulk async copies (cp.async.bulk, sm_90), warp/block reductions.
// Invariant: data produced by another SM is read only after an acquire that observed the
// producer's release, and only through L2 (ld.global.cg): never through the read-only path.
#pragma once
#include <cstdint>
#include <cuda_bf16.h>
#include "kernel_args.h"
#include "generated/isa.cuh"

namespace mk {

constexpr int kConsumerWarps = 8;
constexpr int kLogConsumerWarps = 3;
static_assert(kConsumerWarps == 1 << kLogConsumerWarps, "kLogConsumerWarps = log2(kConsumerWarps)");
constexpr int kConsumerThreads = kConsumerWarps * 32;
// 1: a block of 12 warps, the 8 consumer warps as two warpgroups and the loader warp first
// in a third, whose registers go to the consumers (setmaxnreg: the loader warpgroup down to
// kLoaderRegs, its 3 other warps exit at once, the consumers up to kConsumerRegs): 224
// registers a consumer thread, not the 9-warp block's 168 (3 warps on one of the SM's 4
// sub-partitions, 16K registers each). Per sub-partition then: 2 consumer warps at 224
// and a loader-warpgroup warp at 56, 16128 registers. The default since session 35: 1B
// batch 8 1.465 ms against 1.490 with 0, 8B batch 8 6.601 against 6.636 (H100, same
// process); batch 1-2: megakernel_b1.cu. 0: 9 warps at 168 registers, the last the loader.
#ifndef MK_WARPGROUPS
#define MK_WARPGROUPS 1
#endif
constexpr bool kWarpgroups = MK_WARPGROUPS != 0;
constexpr int kThreads = kConsumerThreads + (kWarpgroups ? 128 : 32);  // + the loader's
// setmaxnreg budgets: at launch every thread holds 168 (65536 / 384, rounded down to 8),
// 384 * 168 in all; the loader warpgroup's 128 * (168 - 56) go to the 256 consumer threads
// (with 40 the loader spilled).
constexpr int kLaunchRegs = 168, kLoaderRegs = 56, kConsumerRegs = 224;
static_assert(!kWarpgroups || 128 * (kLaunchRegs - kLoaderRegs) >=
                                  kConsumerThreads * (kConsumerRegs - kLaunchRegs),
              "the consumers' setmaxnreg.inc takes no more than the loader's .dec frees");
// Ring geometry: build flags (-DMK_NUM_PAGES=..., ...) select it for ablations.
#ifndef MK_PAGE_KB
#define MK_PAGE_KB 32
#endif
#ifndef MK_NUM_PAGES
#define MK_NUM_PAGES 4
#endif
#ifndef MK_L2_PREFETCH_PAGES
#define MK_L2_PREFETCH_PAGES 0  // pages pulled into L2 while the ring stalls (0: none)
#endif
#ifndef MK_L2_STALL_NS
#define MK_L2_STALL_NS 2000     // how long the loader waits for a free slot before that
#endif
#ifndef MK_ACT_FLOATS
#define MK_ACT_FLOATS 8192
#endif
// 1: a CUDA-core matvec at batch 1-2 whose input comes in several chunks and needs no norm
// (DOWN at I > the chunk) loads the next chunk into registers while the current chunk's
// pages compute (kActFloats / 1024 float4 a thread: 16 registers in the batch-1 build,
// where megakernel_b1.cu's MK_B1_STAGE_AHEAD sets it; 32 in the default build).
#ifndef MK_STAGE_AHEAD
#define MK_STAGE_AHEAD 0
#endif
#ifndef MK_WARP_RELEASE
#define MK_WARP_RELEASE 0   // 1: one empty-slot arrival per consumer warp (default: per thread)
#endif
#ifndef MK_TC_SPLIT
#define MK_TC_SPLIT 1       // tensor-core matvec: activations as bf16 hi + lo, two MMAs a step
#endif                      // (0, a diagnostic: hi only, half the MMAs, bf16 activations)
#ifndef MK_TC_WARP_ACC
#define MK_TC_WARP_ACC 1    // tensor-core matvec, where 8 copies of acc fit, each warp adds its
#endif                      // tiles into its own (0: CAS-spin shared atomics per page)
#ifndef MK_WARP_ACC
#define MK_WARP_ACC 1       // CUDA-core matvec: per-warp accumulators (0: shared, CAS atomics)
#endif
// 1: the staging of plan(fold=True) records (Decoder adds it). Off by default: folding was
// no faster on any shape measured, and its code cost the plain path ~1% at batch 8.
#ifndef MK_FOLD
#define MK_FOLD 0
#endif
// 1: ATTN records with merge set (plan(fuse_reduce=True); Decoder adds it). Off by
// default: compiled in, the merge path cost the plain path ~1% at batch 8 (same-call A/B).
#ifndef MK_FUSE_REDUCE
#define MK_FUSE_REDUCE 0
#endif
// 1: ATTN_OPROJ records and the residual copies of EMBED/DOWN (plan(fuse_oproj), the
// default plan at tp = 1 and batch <= 7). 0: a kernel without them (Runtime refuses fused
// plans for it), to time what compiling them in costs the other plans.
#ifndef MK_FUSE_OPROJ
#define MK_FUSE_OPROJ 1
#endif
#ifndef MK_COPY_KB
#define MK_COPY_KB 4        // largest bulk copy of a page row, KB (a row cut into pieces)
#endif
#ifndef MK_MV_VEC4
#define MK_MV_VEC4 0        // CUDA-core matvec: 4 vectors' loads in flight per lane (0: 2)
#endif
#ifndef MK_MV_SCATTER
#define MK_MV_SCATTER 1     // CUDA-core matvec: reduce-scatter of a tile's sums (0: 5 shuffles each)
#endif
#ifndef MK_RECORD_SMEM
#define MK_RECORD_SMEM 1    // instruction records read from a shared-memory copy (0: from L2)
#endif
#ifndef MK_RELEASE_QUIET
#define MK_RELEASE_QUIET 1  // the loader issues nothing while a release fence waits for the SM's
#endif                      // memory ops: 1 from a matvec's or ATTN_OPROJ's last page, 2 from
                            // the outputs; 0 never
// After a release the loader stays quiet until the SM's next instruction has passed its wait,
// or for at most MK_QUIET_WAIT_NS ns; 0 (default): it resumes at the release. An SM that
// finishes a stage last (or nearly) polls for the next one right after its release, and that
// poll queues behind the pages its loader issues then: in the s20 / s23 traces such SMs pass
// their next wait 1.0-1.5 us after the median (bench/NOTES.md, session 38).
#ifndef MK_QUIET_WAIT_NS
#define MK_QUIET_WAIT_NS 0
#endif
// The loader issues nothing while the consumers wait for inputs from L2: 1 through ATTN /
// ATTN_REDUCE, 2 also during a CUDA-core matvec's staging; 0 (default) never.
#ifndef MK_QUIET_INPUTS
#define MK_QUIET_INPUTS 0
#endif
// Pages the loader keeps in flight (issued, not landed) at most; 0: as many as the ring
// has free slots. HBM saturates with a few MB in flight over all SMs (probes/load_latency.cu:
// 2.86 TB/s with one 32 KB page per SM); beyond that every further page lengthens the
// queue that the consumers' misses wait in (5.9 us from issue to land with no cap). H100:
// 2 pages is 0.7% faster at 1B b1, 1.8% at 8B b1; 1 page is 2-4% slower.
#ifndef MK_INFLIGHT_PAGES
#define MK_INFLIGHT_PAGES 2
#endif
// Pages in flight at most while the consumers are on the attention chain (0: the cap above
// throughout). A dependent L2 round trip waits for the SM's own pages in flight to land
// (probes/hop_latency.cu, H100: the counter hop 1.2 us idle, 6.0 with 2 pages in flight on
// every SM, 2.7 for SMs that do not stream while 116 others do), and at 1B batch 1 the ring
// is full ~7 us before the chain ends anyway: a narrower window from the chain's first
// instruction (QKV; ATTN with MK_CHAIN_QKV=0; then ATTN_REDUCE, ATTN_OPROJ, OPROJ) through
// the wait of the next instruction off it (GATEUP), and (MK_CHAIN_DOWN) through DOWN's wait,
// the hop from the last GATEUP. Same-process rows on one H100 (bench/NOTES.md, session 31),
// all three against none: 1B b1 1.048-1.050 vs 1.073-1.075 ms, b2 1.122 vs 1.162-1.165, b8
// 1.504-1.509 vs 1.513-1.521, 8B b8 6.690 vs 6.758; 8B b1 loses, 5.323 vs 5.289.
#ifndef MK_CHAIN_INFLIGHT
#define MK_CHAIN_INFLIGHT 1
#endif
#ifndef MK_CHAIN_QKV
#define MK_CHAIN_QKV 1
#endif
#ifndef MK_CHAIN_DOWN
#define MK_CHAIN_DOWN 1
#endif
// Claimed instructions (KernelArgs::claim): the loader claims the next one only once the
// consumers have started the instruction MK_CLAIM_AHEAD before it, so an SM holds at most
// MK_CLAIM_AHEAD + 1 claimed instructions and the others stay free for idle SMs; the
// loader streams the weights of the ones it holds.
#ifndef MK_CLAIM_AHEAD
#define MK_CLAIM_AHEAD 1
#endif
// 1: the claim code (Program.claim: plan policy "queue", option claim_tail; Decoder adds
// the flag for such programs, Runtime refuses them without it). Off by default: compiled
// in, it cost the static default 1.1-1.7% at 1B batch 1 on the H100 (1.086 against 1.074
// ms, then 1.088 against 1.070-1.073; same process), without a claimed record in sight.
#ifndef MK_CLAIMS
#define MK_CLAIMS 0
#endif
#ifndef MK_RAW_SLOT
#define MK_RAW_SLOT 1       // batches on CUDA cores: the tensor-core staging area is a ring slot
#endif
#ifndef MK_TC_MIN_BUCKET
#define MK_TC_MIN_BUCKET 4  // batch buckets from this one up use tensor cores; 32: none do
#endif
constexpr int kPageBytes = MK_PAGE_KB * 1024;
constexpr int kPageElems = kPageBytes / 2;        // bf16 elements per page
constexpr uint32_t kCopyBytes = MK_COPY_KB * 1024u;
static_assert(MK_COPY_KB >= 1, "bulk copies of at least 1 KB");
// A ring slot holds one page plus 16 bytes for each of 16 rows: tensor-core pages pad their
// rows to an odd multiple of 16 bytes (conflict-free ldmatrix), and the batch-8 page of
// 16 rows x 1024 columns keeps its 16 rows. More would not fit 5 pages in 227 KB.
constexpr int kSlotBytes = kPageBytes + 16 * 16;
constexpr int kTcMinBucket = MK_TC_MIN_BUCKET;
// The largest batch a build takes (megakernel_b1.cu: 2; 0: kMaxBatch, the instruction set's).
#ifndef MK_VARIANT_MAX_BATCH
#define MK_VARIANT_MAX_BATCH 0
#endif
constexpr int kVariantMaxBatch = MK_VARIANT_MAX_BATCH > 0 ? MK_VARIANT_MAX_BATCH : kMaxBatch;
// MK_TC_COMPILED=0 (megakernel_b1.cu's MK_B1_TC=0): the interpreter without the tensor-core
// matvec, which only a build whose every batch runs on CUDA cores can leave out.
#ifndef MK_TC_COMPILED
#define MK_TC_COMPILED 1
#endif
constexpr bool kTcCompiled = MK_TC_COMPILED != 0;
static_assert(kTcCompiled || kTcMinBucket > kVariantMaxBatch,
              "MK_TC_COMPILED=0 needs every batch of the build below MK_TC_MIN_BUCKET");
constexpr int kNumPages = MK_NUM_PAGES;           // prefetch depth, in pages
// kRawSlot: where no tensor-core matvec runs (batch buckets below kTcMinBucket), the raw
// activation area of matvec_tc.cuh (33 KB, otherwise idle) is ring slot kNumPages: one more
// page of prefetch where the ring is what runs dry (a stage boundary, the attention block).
constexpr bool kRawSlot = MK_RAW_SLOT != 0;
constexpr int kMaxSlots = kNumPages + (kRawSlot ? 1 : 0);
constexpr int kInflightPages = MK_INFLIGHT_PAGES;
constexpr bool kClaims = MK_CLAIMS != 0;
constexpr int kChainInflight = MK_CHAIN_INFLIGHT;
static_assert(kChainInflight >= 0, "MK_CHAIN_INFLIGHT: 0 (off) or a page count");
// The opcodes during which (and through the next off-chain instruction's wait) the loader
// keeps at most kChainInflight pages in flight.
__host__ __device__ constexpr bool chain_op(int op) {
  return op == OP_ATTN || op == OP_ATTN_REDUCE || op == OP_ATTN_OPROJ || op == OP_OPROJ ||
         (MK_CHAIN_QKV != 0 && op == OP_QKV);
}
// The opcodes that set the cap at their start: the chain's, and (MK_CHAIN_DOWN) DOWN, which
// is off the chain and so clears it again once its own wait has passed.
__host__ __device__ constexpr bool chain_cap_op(int op) {
  return chain_op(op) || (MK_CHAIN_DOWN != 0 && op == OP_DOWN);
}
// 1 (default): the loader leaves a claimed record in shared memory beside its FIFO entry
// (Ring::claimrec) for the consumers; 0 (session 28's path): they read it from L2 at the
// instruction's head, a round trip behind the pages in flight (its queue traces: claimed
// instructions 0.5-1.8 us longer after their waits than static ones). policy=queue on the
// H100 (session 29): 1B b1 1.157 ms against 1.185, 1B b8 1.870 / 1.906, 8B b1 5.371 / 5.382.
#ifndef MK_CLAIM_REC
#define MK_CLAIM_REC 1
#endif
constexpr bool kClaimRec = MK_CLAIM_REC != 0;
constexpr int kClaimAhead = MK_CLAIM_AHEAD;
static_assert(kClaimAhead >= 0, "MK_CLAIM_AHEAD: instructions, >= 0");
constexpr int kClaimSlots = kClaimAhead + 1;  // the claim FIFO (Ring::claimq)
static_assert(kInflightPages >= 0, "MK_INFLIGHT_PAGES: 0 (no cap) or a page count");
constexpr int kL2PrefetchPages = MK_L2_PREFETCH_PAGES;  // pages past the ring pulled into L2
constexpr int kL2StallNs = MK_L2_STALL_NS;
constexpr bool kWarpRelease = MK_WARP_RELEASE != 0;
constexpr bool kWarpAcc = MK_WARP_ACC != 0;
constexpr bool kTcSplit = MK_TC_SPLIT != 0;
constexpr bool kTcWarpAcc = MK_TC_WARP_ACC != 0;
constexpr bool kRecordSmem = MK_RECORD_SMEM != 0;
constexpr bool kMvVec4 = MK_MV_VEC4 != 0;
constexpr bool kMvScatter = MK_MV_SCATTER != 0;
constexpr bool kReleaseQuiet = MK_RELEASE_QUIET != 0;
constexpr int kQuietWaitNs = MK_QUIET_WAIT_NS;
static_assert(kQuietWaitNs >= 0 && (kQuietWaitNs == 0 || kReleaseQuiet),
              "MK_QUIET_WAIT_NS: ns >= 0, and it extends MK_RELEASE_QUIET's quiet");
constexpr bool kFuseReduce = MK_FUSE_REDUCE != 0;
constexpr bool kFuseOproj = MK_FUSE_OPROJ != 0;
constexpr bool kQuietFromLastPage = MK_RELEASE_QUIET == 1;
// Bulk copies landing in this SM share its L2 return path with the consumers' loads: a
// load on the critical path queues behind up to a ring's worth of pages (~1 us).
constexpr int kQuietInputs = kReleaseQuiet ? MK_QUIET_INPUTS : 0;
constexpr int kActFloats = MK_ACT_FLOATS;         // activation chunk [B, kc] fp32
constexpr bool kStageAhead = MK_STAGE_AHEAD != 0;
// The batch-1 build (megakernel_b1.cu) shrinks the accumulators and the attention op's group
// (their shared memory goes to the ring): instructions over them are refused on the device.
#ifndef MK_ACC_FLOATS
#define MK_ACC_FLOATS kMaxRowsTimesBatch
#endif
#ifndef MK_MAX_G
#define MK_MAX_G 8
#endif
constexpr int kAccFloats = MK_ACC_FLOATS;         // accumulators [rows, B] fp32
constexpr int kMaxG = MK_MAX_G;                   // q heads per kv head the attention op supports
#ifndef MK_ATTN_EXACT_G
#define MK_ATTN_EXACT_G 1  // ATTN unrolled for exactly 4 q heads per kv head where G == 4 (D 64,
#endif                     // 128), heads interleaved; 0: the 8-head code with per-head exits
constexpr bool kAttnExactG = MK_ATTN_EXACT_G != 0;
#ifndef MK_ATTN_TWICE
#define MK_ATTN_TWICE 0  // diagnostic: every ATTN and ATTN_REDUCE runs twice (same outputs);
#endif                   // the phase stamps then time the second run: its code just fetched
constexpr bool kAttnTwice = MK_ATTN_TWICE != 0;
constexpr int kMaxD = 128;                       // head dims 32, 64, 128
// 1: ATTN also writes its partials as flagged pairs (part_ll: {value, tag, value, tag}, tag =
// epoch + 1, the LL format of NCCL's low-latency protocol) and their reader (ATTN_REDUCE, or
// in fused plans ATTN_OPROJ) polls those pairs instead of waiting on the ATTN counters: no
// release fence, counter round trip and bar.sync between a partial's store and its
// reader's load. 0: counters only (this build's default; megakernel_b1.cu's is 1).
#ifndef MK_LL_PARTIALS
#define MK_LL_PARTIALS 0
#endif
constexpr bool kLlPartials = MK_LL_PARTIALS != 0;
// 1: QKV also writes q and the new position's k / v as flagged pairs (q_ll, kv_ll) and ATTN
// polls those instead of waiting on the QKV counters (the position's K/V then come from
// kv_ll, the older positions from the cache, which earlier launches wrote). 0 (default): off.
#ifndef MK_LL_Q
#define MK_LL_Q 0
#endif
constexpr bool kLlQ = MK_LL_Q != 0;
// 1: DOWN also writes the residual it stores (resid[2l+2]) as flagged elements (x_ll[l],
// st_ll1), and its tp = 1 readers on CUDA cores (QKV of layer l + 1, LMHEAD after the last
// layer) poll those while staging instead of waiting on the DOWN counter (matvec.cuh
// x_ll_input): no release, counter round trip and bar.sync between the residual's store
// and its load. DOWN keeps its release: the stage after the attention block waits on it
// for the residual it adds to (lowering.py). A poll sweep that finds an element missing
// sleeps MK_LL_X_SLEEP_NS before the next (132 SMs re-reading the whole residual compete
// with the ring's copies for L2). 0 (default): off. The batch-1/2 build only: in the other,
// whose tensor-core code holds the registers, it spills 36 bytes, and its batches 1-2
// (the only ones that would poll) run in the batch-1/2 build anyway.
#ifndef MK_LL_X
#define MK_LL_X 0
#endif
#if MK_VARIANT_MAX_BATCH == 0 || MK_VARIANT_MAX_BATCH > 2
#undef MK_LL_X
#define MK_LL_X 0
#endif
constexpr bool kLlX = MK_LL_X != 0;
#ifndef MK_LL_X_SLEEP_NS
#define MK_LL_X_SLEEP_NS 128
#endif
// Pairs of x_ll elements a thread's poll keeps in flight (16 bytes each): with 4, 2048
// columns a round, one round at 1B batch 1. The b1 kernel spills 4 bytes with MK_LL_X (with
// 2 as well: its peak is not the poll's).
#ifndef MK_LL_X_PER
#define MK_LL_X_PER 4
#endif

static_assert(kActFloats >= kMaxBatch * 8, "activation chunk must hold 8 columns per batch row");
static_assert(kPageBytes % 16 == 0, "bulk copies move multiples of 16 bytes");
static_assert(kSlotBytes % 128 == 0, "ring slots start 128-byte aligned");

// ---- counters -------------------------------------------------------------------------
__device__ __forceinline__ int32_t ld_acquire(const int32_t* p) {
  int32_t v;
  asm volatile("ld.acquire.gpu.global.b32 %0, [%1];" : "=r"(v) : "l"(p) : "memory");
  return v;
}
__device__ __forceinline__ void red_release_add(int32_t* p, int32_t v) {
  asm volatile("red.release.gpu.global.add.s32 [%0], %1;" :: "l"(p), "r"(v) : "memory");
}
__device__ __forceinline__ void red_relaxed_add(int32_t* p, int32_t v) {
  asm volatile("red.relaxed.gpu.global.add.s32 [%0], %1;" :: "l"(p), "r"(v) : "memory");
}
// A ticket: add 1, releasing this thread's prior writes (and, after a bar.sync, the
// block's) and acquiring those of every earlier taker; returns the old value.
__device__ __forceinline__ int32_t atom_add_acq_rel(int32_t* p, int32_t v) {
  int32_t old;
  asm volatile("atom.acq_rel.gpu.global.add.s32 %0, [%1], %2;" : "=r"(old) : "l"(p), "r"(v)
               : "memory");
  return old;
}
// System scope, for tensor parallelism: a counter another GPU bumps after storing into this
// GPU's memory over NVLink is acquired at system scope, and the bump releases at it.
__device__ __forceinline__ int32_t ld_acquire_sys(const int32_t* p) {
  int32_t v;
  asm volatile("ld.acquire.sys.global.b32 %0, [%1];" : "=r"(v) : "l"(p) : "memory");
  return v;
}
__device__ __forceinline__ void red_release_add_sys(int32_t* p, int32_t v) {
  asm volatile("red.release.sys.global.add.s32 [%0], %1;" :: "l"(p), "r"(v) : "memory");
}
__device__ __forceinline__ int32_t ld_volatile(const int32_t* p) {
  return *reinterpret_cast<const volatile int32_t*>(p);
}
__device__ __forceinline__ uint64_t globaltimer() {
  uint64_t t;
  asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
  return t;
}

// Phase stamps (a build with -DMK_PHASE_STAMPS=1, `trace --phases`): an op marks up to 4
// points inside an instruction; the timing kernel keeps them in KernelArgs::phase_timing.
// Without the flag the calls compile to nothing, so the default kernel is unchanged.
#ifndef MK_PHASE_STAMPS
#define MK_PHASE_STAMPS 0
#endif
#if MK_PHASE_STAMPS
__shared__ int64_t* phase_row;  // the current instruction's row (thread 0's), or null
#endif
// Diagnostic (with MK_PHASE_STAMPS=1): the CUDA-core matvec's phases 1-3 time its first
// activation chunk's staging instead of its pages: 3 every consumer past the bar.sync after
// the counter wait (interpreter), 1 set up (the chunk loop's head), 2 thread 0's loads back;
// 0 stays "staged" (after the next bar.sync). Other ops' phase 3 is then that first one too.
// 2: as 1, but 1 marks consumer_matvec's entry and 2 the chunk loop's head.
#ifndef MK_STAGE_STAMPS
#define MK_STAGE_STAMPS 0
#endif
constexpr int kStageStamps = MK_STAGE_STAMPS;
// 1: a matvec runs its setup before its counter wait, which warp 0 then does right before
// the first activation load (interpreter.cuh); 0: the wait first, as every other op.
#ifndef MK_SETUP_FIRST
#define MK_SETUP_FIRST 1
#endif
constexpr bool kSetupFirst = MK_SETUP_FIRST != 0;
static_assert(!(kStageStamps && kSetupFirst),
              "MK_STAGE_STAMPS times the wait-first order: build it with -DMK_SETUP_FIRST=0");
// Thread 0: stamp phase k (0..3) of the current instruction. After a consumer_sync it marks
// the moment every consumer got there; elsewhere, warp 0's view.
__device__ __forceinline__ void phase_stamp(int k) {
#if MK_PHASE_STAMPS
  if (threadIdx.x == 0 && phase_row) phase_row[k] = static_cast<int64_t>(globaltimer());
#endif
}

// ---- L2-only loads of data produced in this launch -------------------------------------
__device__ __forceinline__ float ldcg(const float* p) { return __ldcg(p); }
__device__ __forceinline__ uint4 ldcg16(const void* p) {
  return __ldcg(reinterpret_cast<const uint4*>(p));
}

// ---- flagged pairs (LL): data that carries its own "written" tag ------------------------
// A 16-byte unit {x0, tag, x1, tag}: the PTX memory model treats a vector access as its
// 8-byte elements, each single-copy atomic, so a reader that sees the tag in an 8-byte half
// sees that half's value from the same store. Volatile: relaxed at system scope, not cached
// in L1, so a poll sees the writer's store once it reaches L2.
__device__ __forceinline__ void st_ll(void* p, float x0, float x1, int tag) {
  asm volatile("st.volatile.global.v4.b32 [%0], {%1, %2, %3, %2};"
               :: "l"(p), "r"(__float_as_int(x0)), "r"(tag), "r"(__float_as_int(x1))
               : "memory");
}
__device__ __forceinline__ uint4 ld_ll(const void* p) {
  uint4 u;
  asm volatile("ld.volatile.global.v4.b32 {%0, %1, %2, %3}, [%4];"
               : "=r"(u.x), "=r"(u.y), "=r"(u.z), "=r"(u.w) : "l"(p));
  return u;
}
// One flagged element {x, tag} (x_ll): a 64-bit scalar store, single-copy atomic. ld_ll2
// reads two of them as two 64-bit elements, each atomic, each checked by its own tag.
__device__ __forceinline__ void st_ll1(void* p, float x, int tag) {
  const uint64_t v = static_cast<uint64_t>(static_cast<uint32_t>(tag)) << 32 |
                     static_cast<uint32_t>(__float_as_int(x));
  asm volatile("st.volatile.global.b64 [%0], %1;" :: "l"(p), "l"(v) : "memory");
}
__device__ __forceinline__ ulonglong2 ld_ll2(const void* p) {
  ulonglong2 u;
  asm volatile("ld.volatile.global.v2.b64 {%0, %1}, [%2];" : "=l"(u.x), "=l"(u.y) : "l"(p));
  return u;
}
// Element x and its tag of an x_ll element read by ld_ll2.
__device__ __forceinline__ float ll1_value(unsigned long long e) {
  return __int_as_float(static_cast<int>(static_cast<uint32_t>(e)));
}
__device__ __forceinline__ bool ll1_ready(unsigned long long e, int tag) {
  return static_cast<int>(static_cast<uint32_t>(e >> 32)) == tag;
}
// Row b of x_ll[l] ([d][2]: x, tag per column): DOWN of layer l's output, resid[2l+2].
__device__ __forceinline__ int32_t* x_ll_row(const KernelArgs& a, int l, int b) {
  return a.x_ll + (static_cast<size_t>(l) * a.B + b) * a.d * 2;
}
__device__ __forceinline__ bool ll_ready(const uint4& u, int tag) {
  return static_cast<int>(u.y) == tag && static_cast<int>(u.w) == tag;
}
// Head h's q_ll units ([D/2][4]) and kv group g's kv_ll units ([2][D/2][4]: K, then V) of
// layer l, batch row b (isa.py).
__device__ __forceinline__ int32_t* q_ll_units(const KernelArgs& a, int l, int b, int h) {
  return a.q_ll + ((static_cast<size_t>(l) * a.B + b) * a.H + h) * (a.D / 2) * 4;
}
__device__ __forceinline__ int32_t* kv_ll_units(const KernelArgs& a, int l, int b, int g) {
  return a.kv_ll + ((static_cast<size_t>(l) * a.B + b) * a.Hkv + g) * a.D * 4;
}

// ---- mbarriers and bulk copies ---------------------------------------------------------
__device__ __forceinline__ uint32_t smem_addr(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}
__device__ __forceinline__ void mbar_init(uint64_t* bar, uint32_t count) {
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;" :: "r"(smem_addr(bar)), "r"(count));
}
__device__ __forceinline__ void fence_mbar_init() {
  asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
}
__device__ __forceinline__ void mbar_arrive(uint64_t* bar) {
  asm volatile("mbarrier.arrive.release.cta.shared::cta.b64 _, [%0];"
               :: "r"(smem_addr(bar)) : "memory");
}
__device__ __forceinline__ void mbar_arrive_expect_tx(uint64_t* bar, uint32_t bytes) {
  asm volatile("mbarrier.arrive.expect_tx.release.cta.shared::cta.b64 _, [%0], %1;"
               :: "r"(smem_addr(bar)), "r"(bytes) : "memory");
}
__device__ __forceinline__ bool mbar_try_wait(uint64_t* bar, uint32_t parity) {
  uint32_t ok;
  asm volatile(
      "{\n .reg .pred p;\n"
      " mbarrier.try_wait.parity.acquire.cta.shared::cta.b64 p, [%1], %2;\n"
      " selp.u32 %0, 1, 0, p;\n}"
      : "=r"(ok) : "r"(smem_addr(bar)), "r"(parity) : "memory");
  return ok != 0;
}
__device__ __forceinline__ uint64_t evict_first_policy() {
  uint64_t policy;
  asm volatile("createpolicy.fractional.L2::evict_first.b64 %0, 1.0;" : "=l"(policy));
  return policy;
}
// Global -> shared bulk copy of `bytes` (multiple of 16, both addresses 16-byte aligned),
// completing on `bar` (complete_tx). Weights are streamed once: evict-first in L2.
__device__ __forceinline__ void bulk_load(void* dst, const void* src, uint32_t bytes,
                                          uint64_t* bar, uint64_t policy) {
  asm volatile(
      "cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes.L2::cache_hint"
      " [%0], [%1], %2, [%3], %4;"
      :: "r"(smem_addr(dst)), "l"(src), "r"(bytes), "r"(smem_addr(bar)), "l"(policy)
      : "memory");
}

// Per-thread asynchronous 16-byte copy global -> shared through L2 only (cp.async.cg, a
// weak generic-proxy access like ld.global.cg, so the acquire-then-bar.sync order of data
// from other SMs covers it); waited for with cp_async_wait_all.
__device__ __forceinline__ void cp_async16(void* dst, const void* src) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;" :: "r"(smem_addr(dst)), "l"(src)
               : "memory");
}
__device__ __forceinline__ void cp_async_commit() {
  asm volatile("cp.async.commit_group;" ::: "memory");
}
__device__ __forceinline__ void cp_async_wait_all() {
  asm volatile("cp.async.wait_group 0;" ::: "memory");
}

// Hint: pull the line holding p into L1, asynchronously.
__device__ __forceinline__ void prefetch_l1(const void* p) {
  asm volatile("prefetch.global.L1 [%0];" :: "l"(p));
}
// Hint: pull `bytes` (multiple of 16, 16-byte aligned) from HBM into L2, asynchronously.
__device__ __forceinline__ void prefetch_l2(const void* src, uint32_t bytes) {
  asm volatile("cp.async.bulk.prefetch.L2.global [%0], %1;" :: "l"(src), "r"(bytes) : "memory");
}

// A flag one role polls while another sets it (no barrier between them): shared-memory
// atomics, so neither the hardware nor compute-sanitizer racecheck sees a plain data race.
__device__ __forceinline__ void set_flag(volatile int* f, int v) {
  atomicExch(const_cast<int*>(f), v);
}
__device__ __forceinline__ int get_flag(volatile int* f) {
  return atomicOr(const_cast<int*>(f), 0);
}

// Named barrier over the consumer warps only (the loader warp never joins it).
__device__ __forceinline__ void consumer_sync() {
  asm volatile("bar.sync 1, %0;" :: "n"(kConsumerThreads) : "memory");
}

// A flagged poll's watchdog, checked every 256th spin (spin 0 starts the clock): true when
// another SM reported an error or the wait ran past the budget.
__device__ __forceinline__ bool ll_give_up(const KernelArgs& a, uint32_t spins, uint64_t& start) {
  if (spins == 0) start = globaltimer();
  return (spins & 255) == 255 &&
         (ld_volatile(a.error) != ERR_NONE ||
          static_cast<int64_t>(globaltimer() - start) > a.watchdog_ns);
}

// Every consumer thread: flagged units i = tid, tid + kConsumerThreads, ... < n (at most
// kPer of them, a compile-time bound), at src(i), polled until both tags read `tag`, their
// loads in flight together; sink(i, x0, x1) gets each. false: the wait ran past the
// watchdog or another SM reported an error (sink then got nothing for some units).
template <int kPer, typename Src, typename Sink>
__device__ __forceinline__ bool poll_ll(const KernelArgs& a, int n, int tag, Src&& src,
                                        Sink&& sink) {
  uint32_t pending = 0;
#pragma unroll
  for (int k = 0; k < kPer; ++k)
    pending |= static_cast<int>(threadIdx.x) + k * kConsumerThreads < n ? 1u << k : 0u;
  uint64_t start = 0;
#pragma unroll 1
  for (uint32_t spins = 0; pending; ++spins) {
    uint4 u[kPer];
#pragma unroll
    for (int k = 0; k < kPer; ++k)
      if (pending >> k & 1) u[k] = ld_ll(src(threadIdx.x + k * kConsumerThreads));
#pragma unroll
    for (int k = 0; k < kPer; ++k) {
      if ((pending >> k & 1) && ll_ready(u[k], tag)) {
        pending &= ~(1u << k);
        sink(threadIdx.x + k * kConsumerThreads, __int_as_float(static_cast<int>(u[k].x)),
             __int_as_float(static_cast<int>(u[k].z)));
      }
    }
    if (pending && ll_give_up(a, spins, start)) return false;
  }
  return true;
}

// ---- reductions -----------------------------------------------------------------------
__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

__device__ __forceinline__ void bf16x8_to_float(const uint4& u, float* f) {
  const __nv_bfloat162* h = reinterpret_cast<const __nv_bfloat162*>(&u);
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    float2 t = __bfloat1622float2(h[i]);
    f[2 * i] = t.x;
    f[2 * i + 1] = t.y;
  }
}

}  // namespace mk
