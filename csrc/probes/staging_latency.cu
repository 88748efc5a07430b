// Probe: what does a consumer stage's input load cost while the SM's loader streams weights?
//
// The phase stamps of the 1B batch-1 step (bench/NOTES.md, session 11) put every stage's
// first dependent load -- 8 to 32 KB of activations another SM wrote microseconds before,
// L2-resident -- at 1.25-1.6 us where few pages are in flight and 2.7-3.7 us where the ring
// streams, against 0.3-0.5 us per dependent L2 hit in load_latency.cu. This measures the
// kernel's own pattern: per SM, warp 0 streams 4 MB through `slots` 32 KB slots (at most
// `slots` pages in flight, as MK_INFLIGHT_PAGES), while 8 consumer warps stage `kb` KB of
// L2-resident floats again and again, each round timed from its first load to the bar.sync
// after the last (thread 0's clock):
//   ldcg   every thread loads its 16-byte vectors (ld.global.cg), all issued before the first
//          use, and stores them to shared memory (stage_chunk in matvec.cuh)
//   bulk   thread 0 issues one cp.async.bulk of the region into shared memory on an
//          mbarrier that every consumer waits on
//   fresh  as ldcg, but each round first rewrites the next SM's region (and fences), so
//          the lines read were written by another SM one round before, as activations are
//   shared as ldcg, but every SM reads the same region (SM 0's), as every SM of a batch-8
//          matvec stage reads the same activation chunk
//   cpasync every thread copies its 16-byte vectors with cp.async.cg (the tensor-core
//          matvec's load_chunk_tc), then waits for them, then the bar.sync
// Per row: the stream's TB/s and the median over SMs of the mean round, median over trials.
//
//   nvcc -O3 -std=c++17 -gencode=arch=compute_90a,code=sm_90a csrc/probes/staging_latency.cu \
//        -o /tmp/stageprobe && /tmp/stageprobe [trials=9]
#include "probe_util.cuh"

namespace {

using namespace probe;

constexpr int kConsumers = 256;        // 8 warps, as the megakernel
constexpr int kThreads = 32 + kConsumers;
constexpr int kIdleRounds = 100;       // timed rounds when nothing streams
constexpr uint32_t kMaxStageBytes = 32 * 1024;
constexpr int kSmem = kStreamSmem + kMaxStageBytes + 16;
enum Mode { kLdcg = 0, kBulk = 1, kFresh = 2, kShared = 3, kCpAsync = 4 };
const char* const kModeNames[] = {"ldcg", "bulk", "fresh", "shared", "cpasync"};

__device__ __forceinline__ void consumer_sync() {
  asm volatile("bar.sync 1, %0;" :: "n"(kConsumers) : "memory");
}

// out: [block] {stream start, stream end, mean round ns x 1000, rounds}.
__global__ void __launch_bounds__(kThreads, 1)
stream_and_stage(const unsigned char* data, uint32_t pages, int slots, float* act,
                 uint32_t bytes, int mode, int64_t* out) {
  extern __shared__ __align__(128) unsigned char smem[];
  __shared__ volatile int done, stop;
  if (threadIdx.x == 0) done = stop = 0;
  float4* stage = reinterpret_cast<float4*>(smem + kStreamSmem);
  uint64_t* bar = reinterpret_cast<uint64_t*>(smem + kStreamSmem + kMaxStageBytes);
  if (threadIdx.x == 32) {
    asm volatile("mbarrier.init.shared::cta.b64 [%0], 1;" :: "r"(sa(bar)));
    asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
  }
  __syncthreads();
  if (threadIdx.x < 32) {
    stream_role(smem, data, pages, slots, out, done);
    return;
  }
  const int tid = threadIdx.x - 32;
  const uint32_t vecs = bytes / 16;
  const float4* mine = reinterpret_cast<const float4*>(
      act + (mode == kShared ? 0 : blockIdx.x) * (kMaxStageBytes / 4));
  float4* next = reinterpret_cast<float4*>(act + ((blockIdx.x + 1) % gridDim.x) *
                                                     (kMaxStageBytes / 4));
  for (uint32_t v = tid; v < vecs; v += kConsumers) stage[v] = __ldcg(mine + v);  // warm L2
  consumer_sync();
  uint64_t total = 0;
  int64_t rounds = 0;
  uint32_t parity = 0;
  float sink = 0.f;
  while (true) {
    if (tid == 0) stop = slots > 0 ? done : rounds >= kIdleRounds;
    consumer_sync();
    if (stop) break;
    consumer_sync();  // every consumer read stop before thread 0 can rewrite it
    if (mode == kFresh) {
      for (uint32_t v = tid; v < vecs; v += kConsumers)
        next[v] = make_float4(rounds, v, 1.f, 2.f);
      __threadfence();
      consumer_sync();
    }
    const uint64_t t = now();
    if (mode == kBulk) {
      if (tid == 0) {
        // the consumers' earlier generic writes to stage before the async proxy's
        asm volatile("fence.proxy.async.shared::cta;" ::: "memory");
        asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;"
                     :: "r"(sa(bar)), "r"(bytes) : "memory");
        asm volatile("cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes"
                     " [%0], [%1], %2, [%3];"
                     :: "r"(sa(stage)), "l"(mine), "r"(bytes), "r"(sa(bar)) : "memory");
      }
      uint32_t ok = 0;
      while (!ok)
        asm volatile("{ .reg .pred p; mbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2; "
                     "selp.u32 %0, 1, 0, p; }" : "=r"(ok) : "r"(sa(bar)), "r"(parity) : "memory");
      parity ^= 1;
      sink += stage[tid].x;
    } else if (mode == kCpAsync) {
      for (uint32_t v = tid; v < vecs; v += kConsumers)
        asm volatile("cp.async.cg.shared.global [%0], [%1], 16;" :: "r"(sa(stage + v)),
                     "l"(mine + v) : "memory");
      asm volatile("cp.async.commit_group;" ::: "memory");
      asm volatile("cp.async.wait_group 0;" ::: "memory");
    } else {
      float4 x[8];  // up to 32 KB: 8 vectors per thread, all issued before the first use
#pragma unroll
      for (int u = 0; u < 8; ++u) {
        const uint32_t v = tid + u * kConsumers;
        x[u] = v < vecs ? __ldcg(mine + v) : make_float4(0.f, 0.f, 0.f, 0.f);
      }
#pragma unroll
      for (int u = 0; u < 8; ++u) {
        const uint32_t v = tid + u * kConsumers;
        if (v < vecs) stage[v] = x[u];
      }
    }
    consumer_sync();
    total += now() - t;
    ++rounds;
  }
  if (tid == 0) {
    out[4 * blockIdx.x + 2] = static_cast<int64_t>(total * 1000 / (rounds > 0 ? rounds : 1));
    out[4 * blockIdx.x + 3] = sink == 12345.f ? -1 : rounds;  // keeps the bulk reads live
  }
}

}  // namespace

int main(int argc, char** argv) {
  const int trials = argc > 1 ? std::atoi(argv[1]) : 9;
  const int sms = sms_with_banner(trials);
  StreamTrials st(sms);
  float* act;
  CHECK(cudaMalloc(&act, static_cast<size_t>(sms) * kMaxStageBytes));
  fill<<<sms, 256>>>(reinterpret_cast<uint32_t*>(act), sms * kMaxStageBytes / 4, 3u);
  CHECK(cudaFuncSetAttribute(stream_and_stage, cudaFuncAttributeMaxDynamicSharedMemorySize,
                             kSmem));
  for (uint32_t kb : {8u, 32u}) {
    for (int mode : {kLdcg, kBulk, kFresh, kShared, kCpAsync}) {
      for (int slots : {0, 1, 2, 4}) {
        const StreamTrials::Result r = st.run(trials, [&] {
          stream_and_stage<<<sms, kThreads, kSmem>>>(st.data, st.pages(), slots, act, kb * 1024,
                                                     mode, st.out);
        });
        if (slots == 0)
          std::printf("%2u KB %-5s no stream           : round %7.0f ns\n", kb,
                      kModeNames[mode], r.value_ns);
        else
          std::printf("%2u KB %-5s %d page(s) in flight: round %7.0f ns, stream %.3f TB/s\n",
                      kb, kModeNames[mode], slots, r.value_ns, r.tbps);
      }
    }
  }
  CHECK(cudaFree(act));
  return 0;
}
