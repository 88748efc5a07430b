// Probe: what does a hop between two stages cost while every SM streams weights -- through
// global memory and counters, as the megakernel's hops are, against a cluster's distributed
// shared memory?
//
// At 1B batch 1 the attention chain (previous DOWN's end to GATEUP's wait, ~21 us a layer,
// HBM mostly idle behind a full ring) is three stages and four hops; two of them stay inside
// one kv head: QKV's 16 slices of a head (q, k, v: 384 rows) feed that head's 16 ATTN splits,
// and those splits feed the head's 16 ATTN_OPROJ row blocks, each of which reads every split.
// If a kv head's 16 SMs formed a cluster, both hops could be stores into the peers' shared
// memory completing on their mbarriers instead of a store, a release fence, a counter add, a
// poll and a load (bench/NOTES.md, session 29). Whether that is worth re-planning the chain
// depends on two numbers this measures: how many clusters of C blocks of the kernel's shape
// (one block an SM, ~224 KB of shared memory) the GPU holds at once, and what one all-to-all
// hop costs each way under the weight stream.
//
// A round is an all-to-all exchange inside each group of C blocks: every block contributes a
// piece of `kPieceBytes` (an ATTN split's partials at 1B: 4 heads x 64 floats) and must have
// read every piece of its group (checked word by word) before the round ends. Modes:
//   global  the piece stored to global memory; bar.sync; thread 0 red.release.gpu.add on the
//           group's counter (the kernel's signal) and polls it with ld.acquire.gpu until C x
//           (round + 1); bar.sync; each thread loads its word of every piece (ld.global.cg)
//   nofence as global with red.relaxed and ld.relaxed (a diagnostic of what the release and
//           acquire cost: nothing orders the pieces before the count, so a word read wrong is
//           possible and reported, not an error of the probe)
//   flag    the piece as {value, tag} pairs (tag = round + 1: MK_LL_*'s format) with no fence
//           or counter; each thread polls its word of every piece until the tags match
//   dsmem   a cluster launch of C blocks: st.async of the piece into every peer's shared
//           memory, completing its bytes on the peer's mbarrier; each thread waits on its
//           own mbarrier, then reads the pieces from its shared memory
// Two buffers alternate by round parity, so a piece is never overwritten before every reader
// of its round is done (a block two rounds ahead has seen every peer's next piece). Each
// round is timed by thread 0 from its start to the bar.sync after the reads; rounds count
// while the SM's warp 0 still streams (every round where it does not stream). Per row: the
// median over blocks of the mean round, median over trials; the stream's TB/s.
//
// With quiet_sms > 0 the first groups covering that many SMs do not stream while the others
// do, and their rounds count while any block still streams: whether a hop waits for its own
// SM's pages in flight or for everyone's (a chain on SMs that do not stream), and what the
// rest stream without them.
//
//   nvcc -O3 -std=c++17 -gencode=arch=compute_90a,code=sm_90a csrc/probes/hop_latency.cu \
//        -o /tmp/hopprobe && /tmp/hopprobe [trials=9 [mode [quiet_sms]]]
#include "probe_util.cuh"

namespace {

using namespace probe;

constexpr int kConsumers = 256;  // 8 warps, as the megakernel
constexpr int kThreads = 32 + kConsumers;
constexpr int kRounds = 64;
constexpr int kMaxGroup = 16;
constexpr uint32_t kPieceBytes = 1024;
constexpr uint32_t kPieceWords = kPieceBytes / 4;
static_assert(kPieceWords == kConsumers, "one word of a piece per consumer thread");
constexpr uint32_t kRecvOffset = (kStreamSmem + 127) & ~127u;
constexpr uint32_t kRecvBytes = 2 * kMaxGroup * kPieceBytes;
constexpr uint32_t kSmem = kRecvOffset + kRecvBytes + 2 * 8;
static_assert(kSmem <= 227 * 1024, "one block an SM");
enum Mode { kGlobal = 0, kFlag = 1, kDsmem = 2, kNoFence = 3 };
const char* const kModeNames[] = {"global", "flag", "dsmem", "nofence"};

__device__ __forceinline__ void consumer_sync() {
  asm volatile("bar.sync 1, %0;" :: "n"(kConsumers) : "memory");
}
__device__ __forceinline__ void cluster_sync_all() {
  asm volatile("barrier.cluster.arrive.release.aligned;\n\tbarrier.cluster.wait.acquire.aligned;"
               ::: "memory");
}
// The word a block writes at `word` of its piece in round r: distinct per round, block, word.
__device__ __forceinline__ uint32_t piece_word(int r, int block, uint32_t word) {
  return (static_cast<uint32_t>(r) * 2654435761u) ^ (static_cast<uint32_t>(block) << 12) ^ word;
}

// out: [block] {stream start, stream end, mean round ns x 1000, rounds counted}.
// gbuf: [2][grid][kPieceWords] words (global), or [2][grid][kPieceWords] {value, tag} pairs
// (flag); counters: [grid / C], zero at launch; flag buffers zero at launch; err: words
// read back wrong, summed over the blocks.
__global__ void __launch_bounds__(kThreads, 1)
stream_and_hop(const unsigned char* data, uint32_t pages, int slots, int mode, int group,
               int quiet_groups, uint32_t* gbuf, int32_t* counters, int* err, int64_t* out) {
  extern __shared__ __align__(128) unsigned char smem[];
  __shared__ volatile int done;
  uint32_t* recv = reinterpret_cast<uint32_t*>(smem + kRecvOffset);  // [2][group][words]
  uint64_t* bars = reinterpret_cast<uint64_t*>(smem + kRecvOffset + kRecvBytes);
  if (threadIdx.x == 0) {
    done = 0;
    for (int p = 0; p < 2; ++p)
      asm volatile("mbarrier.init.shared::cta.b64 [%0], 1;" :: "r"(sa(bars + p)));
    asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
  }
  __syncthreads();
  if (mode == kDsmem) cluster_sync_all();  // every peer's mbarriers initialised
  // A quiet group's blocks do not stream while the others do; they count their rounds while
  // any streaming block still streams (streams_done, after the groups' counters, below the
  // number of streaming blocks).
  const bool quiet = slots > 0 && static_cast<int>(blockIdx.x) / group < quiet_groups;
  int32_t* streams_done = counters + gridDim.x;
  const int streamers = static_cast<int>(gridDim.x) - quiet_groups * group;
  if (threadIdx.x < 32) {
    if (quiet) {
      if (threadIdx.x == 0) {
        out[4 * blockIdx.x] = -1;
        out[4 * blockIdx.x + 1] = 1;
      }
    } else {
      stream_role(smem, data, pages, slots, out, done);
      if (threadIdx.x == 0 && slots > 0) atomicAdd(streams_done, 1);
    }
  } else {
    const uint32_t tid = threadIdx.x - 32;
    const int rank = blockIdx.x % group, first = blockIdx.x - rank;
    int errors = 0;
    if (mode == kDsmem) {
      uint32_t cr;
      asm volatile("mov.u32 %0, %%cluster_ctarank;" : "=r"(cr));
      if (static_cast<int>(cr) != rank) errors = 1 << 20;  // the cluster is not the group
    }
    uint64_t total = 0;
    int64_t counted = 0;
    for (int r = 0; r < kRounds; ++r) {
      const int par = r & 1;
      const uint64_t t = now();
      if (mode == kGlobal || mode == kNoFence) {
        gbuf[(static_cast<size_t>(par) * gridDim.x + blockIdx.x) * kPieceWords + tid] =
            piece_word(r, blockIdx.x, tid);
        consumer_sync();
        if (tid == 0) {
          int32_t* c = counters + blockIdx.x / group;
          if (mode == kGlobal)
            asm volatile("red.release.gpu.global.add.s32 [%0], 1;" :: "l"(c) : "memory");
          else
            asm volatile("red.relaxed.gpu.global.add.s32 [%0], 1;" :: "l"(c) : "memory");
          const int32_t target = group * (r + 1);
          int32_t v;
          do {
            if (mode == kGlobal)
              asm volatile("ld.acquire.gpu.global.s32 %0, [%1];" : "=r"(v) : "l"(c) : "memory");
            else
              asm volatile("ld.relaxed.gpu.global.s32 %0, [%1];" : "=r"(v) : "l"(c) : "memory");
          } while (v - target < 0);
        }
        consumer_sync();
        for (int j = 0; j < group; ++j) {
          const uint32_t v = __ldcg(
              gbuf + (static_cast<size_t>(par) * gridDim.x + first + j) * kPieceWords + tid);
          errors += v != piece_word(r, first + j, tid);
        }
      } else if (mode == kFlag) {
        uint2* pairs = reinterpret_cast<uint2*>(gbuf);
        const uint32_t tag = r + 1;
        uint2* mine = pairs + (static_cast<size_t>(par) * gridDim.x + blockIdx.x) * kPieceWords + tid;
        asm volatile("st.volatile.global.v2.u32 [%0], {%1, %2};"
                     :: "l"(mine), "r"(piece_word(r, blockIdx.x, tid)), "r"(tag) : "memory");
        for (int j = 0; j < group; ++j) {
          const uint2* p =
              pairs + (static_cast<size_t>(par) * gridDim.x + first + j) * kPieceWords + tid;
          uint32_t v, g;
          do {
            asm volatile("ld.volatile.global.v2.u32 {%0, %1}, [%2];"
                         : "=r"(v), "=r"(g) : "l"(p) : "memory");
          } while (g != tag);
          errors += v != piece_word(r, first + j, tid);
        }
      } else {
        const uint32_t bar = sa(bars + par), phase = (r >> 1) & 1;
        if (tid == 0)
          asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;"
                       :: "r"(bar), "r"(group * kPieceBytes) : "memory");
        // 16-byte stores: piece word q * 4 .. q * 4 + 3 to every peer, spread over the threads.
        const uint32_t vecs = kPieceBytes / 16;
        for (uint32_t k = tid; k < group * vecs; k += kConsumers) {
          const uint32_t peer = k / vecs, q = k % vecs;
          const uint32_t local = sa(recv + (par * group + rank) * kPieceWords + q * 4);
          uint32_t raddr, rbar;
          asm volatile("mapa.shared::cluster.u32 %0, %1, %2;" : "=r"(raddr) : "r"(local), "r"(peer));
          asm volatile("mapa.shared::cluster.u32 %0, %1, %2;" : "=r"(rbar) : "r"(bar), "r"(peer));
          asm volatile(
              "st.async.shared::cluster.mbarrier::complete_tx::bytes.v4.b32 [%0], {%1, %2, %3, %4}, [%5];"
              :: "r"(raddr), "r"(piece_word(r, blockIdx.x, q * 4)),
                 "r"(piece_word(r, blockIdx.x, q * 4 + 1)), "r"(piece_word(r, blockIdx.x, q * 4 + 2)),
                 "r"(piece_word(r, blockIdx.x, q * 4 + 3)), "r"(rbar) : "memory");
        }
        uint32_t ok = 0;
        while (!ok)
          asm volatile("{ .reg .pred p; mbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2; "
                       "selp.u32 %0, 1, 0, p; }" : "=r"(ok) : "r"(bar), "r"(phase) : "memory");
        for (int j = 0; j < group; ++j)
          errors += recv[(par * group + j) * kPieceWords + tid] != piece_word(r, first + j, tid);
      }
      consumer_sync();
      const bool streaming =
          slots == 0 || (quiet ? *reinterpret_cast<volatile int32_t*>(streams_done) < streamers
                               : !done);
      if (streaming) {
        total += now() - t;
        ++counted;
      }
    }
    if (errors) atomicAdd(err, errors);
    if (tid == 0) {
      out[4 * blockIdx.x + 2] = static_cast<int64_t>(total * 1000 / (counted ? counted : 1));
      out[4 * blockIdx.x + 3] = counted;
    }
  }
  if (mode == kDsmem) cluster_sync_all();  // no peer exits while another still writes to it
}

}  // namespace

int main(int argc, char** argv) {
  const int trials = argc > 1 ? std::atoi(argv[1]) : 9;
  const int only = argc > 2 ? std::atoi(argv[2]) : -1;  // one mode (0 global, 1 flag, 2 dsmem,
                                                        // 3 nofence)
  const int quiet_sms = argc > 3 ? std::atoi(argv[3]) : 0;  // SMs (whole groups) that do not
                                                            // stream while the others do
  const int sms = sms_with_banner(trials);
  StreamTrials st(sms);
  uint32_t* gbuf;
  int32_t* counters;
  int* err;
  CHECK(cudaMalloc(&err, sizeof(int)));
  const size_t gbuf_bytes = static_cast<size_t>(2) * sms * kPieceWords * 8;  // flag: pairs
  CHECK(cudaMalloc(&gbuf, gbuf_bytes));
  CHECK(cudaMalloc(&counters, (sms + 1) * sizeof(int32_t)));  // groups', then streams_done
  CHECK(cudaFuncSetAttribute(stream_and_hop, cudaFuncAttributeMaxDynamicSharedMemorySize, kSmem));
  CHECK(cudaFuncSetAttribute(stream_and_hop, cudaFuncAttributeNonPortableClusterSizeAllowed, 1));
  std::printf("block: %d threads, %u B of dynamic shared memory; piece %u B, %d rounds\n",
              kThreads, kSmem, kPieceBytes, kRounds);
  for (int group : {2, 4, 8, 16}) {
    cudaLaunchConfig_t cfg = {};
    cudaLaunchAttribute attr[1];
    attr[0].id = cudaLaunchAttributeClusterDimension;
    attr[0].val.clusterDim.x = group;
    attr[0].val.clusterDim.y = 1;
    attr[0].val.clusterDim.z = 1;
    cfg.gridDim = dim3(sms / group * group);
    cfg.blockDim = dim3(kThreads);
    cfg.dynamicSmemBytes = kSmem;
    cfg.attrs = attr;
    cfg.numAttrs = 1;
    int clusters = 0;
    const cudaError_t occ = cudaOccupancyMaxActiveClusters(&clusters, stream_and_hop, &cfg);
    if (occ != cudaSuccess) {
      std::printf("C=%2d: cudaOccupancyMaxActiveClusters: %s\n", group, cudaGetErrorString(occ));
      (void)cudaGetLastError();
      clusters = 0;
    }
    const int grid = std::min(clusters, sms / group) * group;
    std::printf("C=%2d: at most %d clusters resident (%d SMs); grid %d\n", group, clusters,
                clusters * group, grid);
    if (grid == 0) continue;
    cfg.gridDim = dim3(grid);
    const int quiet_groups = std::min((quiet_sms + group - 1) / group, grid / group - 1);
    if (quiet_groups > 0)
      std::printf("C=%2d: %d SMs of %d do not stream\n", group, quiet_groups * group, grid);
    for (int mode : {kGlobal, kFlag, kDsmem, kNoFence}) {
      if (only >= 0 && mode != only) continue;
      cfg.numAttrs = mode == kDsmem ? 1 : 0;
      for (int slots : {0, 2, 4}) {
        CHECK(cudaMemset(err, 0, sizeof(int)));
        const StreamTrials::Result r = st.run(trials, [&] {
          CHECK(cudaMemsetAsync(gbuf, 0, gbuf_bytes));
          CHECK(cudaMemsetAsync(counters, 0, (sms + 1) * sizeof(int32_t)));
          CHECK(cudaLaunchKernelEx(&cfg, stream_and_hop, static_cast<const unsigned char*>(st.data),
                                   st.pages(), slots, mode, group, quiet_groups, gbuf, counters,
                                   err, st.out));
        });
        int errors = 0;
        CHECK(cudaMemcpy(&errors, err, sizeof(int), cudaMemcpyDeviceToHost));
        std::printf("C=%2d %-6s %d page(s) in flight: round %6.0f ns", group, kModeNames[mode],
                    slots, r.value_ns);
        if (slots) std::printf(", stream %.3f TB/s", r.tbps);
        if (slots && quiet_groups > 0) std::printf(", quiet groups' round %6.0f ns", r.quiet_ns);
        std::printf("%s", slots ? "\n" : " (no stream)\n");
        if (errors)
          std::printf(mode == kNoFence ? "  %d words read stale (nothing orders them here)\n"
                                       : "  ERROR: %d words read wrong\n", errors);
      }
    }
  }
  CHECK(cudaFree(gbuf));
  CHECK(cudaFree(counters));
  CHECK(cudaFree(err));
  return 0;
}
