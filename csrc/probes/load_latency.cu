// Probe: how long does a consumer's L2 round trip take while the SM's loader streams weights
// from HBM, and how does that depend on the pages the loader keeps in flight?
//
// The megakernel's page stamps (bench/NOTES.md, session 10) put a waited-for page's issue ->
// land at 5.9 us median, against ~1 us for an idle HBM: with every SM keeping up to 5 pages
// of 32 KB in flight, ~20 MB queue in front of the memory controllers. Every dependent L2
// access on the consumers' critical path (counter polls, input loads, release fences) may
// queue behind them. This measures it directly: per SM, warp 0 streams 4 MB through `slots`
// slots (so at most `slots` pages are in flight, as MK_INFLIGHT_PAGES does in the kernel),
// and warp 1 chases pointers through 64 L2-resident lines (ld.global.cg: L2 hits, never L1)
// for as long as the stream runs. Per row: the stream's TB/s and the median over SMs of the
// mean L2-hit round trip, each the median over trials.
//
//   nvcc -O3 -std=c++17 -gencode=arch=compute_90a,code=sm_90a csrc/probes/load_latency.cu \
//        -o /tmp/latprobe && /tmp/latprobe [trials=9]
#include "probe_util.cuh"

namespace {

using namespace probe;

constexpr int kChaseLines = 64;   // per SM, 128 bytes apart
constexpr int kChaseSteps = 16;   // dependent loads per timed run
constexpr int kIdleRuns = 200;    // timed runs when nothing streams

// slots 0: no stream (the idle round trip). out: [block] {stream start, stream end,
// round-trip ns x 1000, runs}.
__global__ void __launch_bounds__(64, 1)
stream_and_chase(const unsigned char* data, uint32_t pages, int slots, const uint32_t* chase,
                 int64_t* out) {
  extern __shared__ __align__(128) unsigned char smem[];
  __shared__ volatile int done;
  if (threadIdx.x == 0) done = 0;
  __syncthreads();
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  if (warp == 0) {
    stream_role(smem, data, pages, slots, out, done);
  } else if (lane == 0) {
    const uint32_t* base = chase + static_cast<size_t>(blockIdx.x) * kChaseLines * 32;
    uint32_t i = 0;
    for (int k = 0; k < kChaseLines; ++k) i = __ldcg(base + i * 32);  // warm L2
    uint64_t total = 0;
    int64_t runs = 0;
    while (slots > 0 ? !done : runs < kIdleRuns) {
      const uint64_t t = now();
#pragma unroll
      for (int k = 0; k < kChaseSteps; ++k) i = __ldcg(base + i * 32);
      total += now() - t;
      ++runs;
    }
    const int64_t loads = runs > 0 ? runs * kChaseSteps : 1;
    out[4 * blockIdx.x + 2] = static_cast<int64_t>(total * 1000 / loads);
    out[4 * blockIdx.x + 3] = i < kChaseLines ? runs : -1;  // keeps the last loads live
  }
}

}  // namespace

int main(int argc, char** argv) {
  const int trials = argc > 1 ? std::atoi(argv[1]) : 9;
  const int sms = sms_with_banner(trials);
  StreamTrials st(sms);
  uint32_t* chase;
  CHECK(cudaMalloc(&chase, static_cast<size_t>(sms) * kChaseLines * 128));
  // Line k of each SM's chain points to line (k * 37 + 1) % 64: a single cycle through all
  // 64 lines (37 is odd, so x -> 37x + 1 is a full-period map mod 64).
  std::vector<uint32_t> host_chase(static_cast<size_t>(sms) * kChaseLines * 32, 0u);
  for (int s = 0; s < sms; ++s)
    for (int k = 0; k < kChaseLines; ++k)
      host_chase[(static_cast<size_t>(s) * kChaseLines + k) * 32] = (k * 37 + 1) % kChaseLines;
  CHECK(cudaMemcpy(chase, host_chase.data(), host_chase.size() * 4, cudaMemcpyHostToDevice));
  const int smem = kStreamSmem;
  CHECK(cudaFuncSetAttribute(stream_and_chase, cudaFuncAttributeMaxDynamicSharedMemorySize, smem));
  for (int slots : {0, 1, 2, 3, 4}) {
    const StreamTrials::Result r = st.run(trials, [&] {
      stream_and_chase<<<sms, 64, smem>>>(st.data, st.pages(), slots, chase, st.out);
    });
    if (slots == 0)
      std::printf("no stream                 : L2-hit round trip %7.0f ns\n", r.value_ns);
    else
      std::printf("%d page(s) in flight per SM: %7.1f us -> %.3f TB/s, "
                  "L2-hit round trip %7.0f ns\n", slots, r.wall_us, r.tbps,
                  r.value_ns);
  }
  CHECK(cudaFree(chase));
  return 0;
}
