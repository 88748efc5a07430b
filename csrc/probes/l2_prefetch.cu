// Probe: does pulling weights into L2 ahead of time make the megakernel's bulk copies
// (cp.async.bulk global -> shared, evict-first) faster on an H100? bench/NOTES.md records
// that every L2 prefetch variant in the kernel measured no gain; this isolates the question
// from the kernel's timing.
//
// One block per SM, each with its own region of `region_kb` KB of bf16 data. Per trial:
//   1. (prefetch modes) the block asks L2 for the first `ahead_kb` KB of its region:
//      cp.async.bulk.prefetch.L2 in 32 KB pieces (mode 1) or prefetch.global.L2 per
//      128-byte line (mode 2);
//   2. every block idles `idle_us` (HBM has nothing else to do: the prefetches can land);
//   3. the block streams its whole region through a ring of 32 KB shared pages (4 slots, as
//      the kernel; 2 or 6 in some rows) with the kernel's bulk copies (4 KB pieces, or 16 /
//      32 KB in some rows; evict-first or no hint) and times it.
// Between trials a 160 MB buffer is rewritten so no trial starts with a warm L2.
// Prints, per mode, the median over trials of the slowest block's stream time and of the
// mean block's, and the implied TB/s.
//
//   nvcc -O3 -std=c++17 -gencode=arch=compute_90a,code=sm_90a csrc/probes/l2_prefetch.cu \
//        -o /tmp/l2probe && /tmp/l2probe [region_kb=512] [idle_us=20] [trials=15]
#include <algorithm>
#include <vector>

#include "probe_util.cuh"

namespace {

using namespace probe;

__global__ void __launch_bounds__(32, 1)
stream(const unsigned char* data, size_t region, size_t ahead, int mode, int hint,
       uint64_t idle_ns, int kSlots, uint32_t kPiece, int64_t* out) {
  extern __shared__ __align__(128) unsigned char smem[];
  const int lane = threadIdx.x;
  const unsigned char* src = data + blockIdx.x * region;
  const uint64_t t0 = now();
  if (mode == 1 && lane == 0) {
    for (size_t o = 0; o < ahead; o += kPage)
      asm volatile("cp.async.bulk.prefetch.L2.global [%0], %1;" :: "l"(src + o), "r"(kPage)
                   : "memory");
  } else if (mode == 2) {
    for (size_t o = 128 * lane; o < ahead; o += 32 * 128)
      asm volatile("prefetch.global.L2 [%0];" :: "l"(src + o));
  }
  while (now() - t0 < idle_ns) {}
  uint64_t policy;
  asm volatile("createpolicy.fractional.L2::evict_first.b64 %0, 1.0;" : "=l"(policy));
  const uint64_t t1 = now();
  const uint32_t pages = static_cast<uint32_t>(region / kPage);
  stream_pages(smem, pages, kSlots, kPiece, hint != 0, policy,
               [&](uint32_t it) { return src + static_cast<size_t>(it) * kPage; });
  if (lane == 0) out[blockIdx.x] = static_cast<int64_t>(now() - t1);
}

}  // namespace

int main(int argc, char** argv) {
  const size_t region = (argc > 1 ? std::atoi(argv[1]) : 512) * size_t{1024};
  const uint64_t idle_ns = (argc > 2 ? std::atoi(argv[2]) : 20) * uint64_t{1000};
  const int trials = argc > 3 ? std::atoi(argv[3]) : 15;
  int sms = 0;
  CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, 0));
  cudaDeviceProp prop;
  CHECK(cudaGetDeviceProperties(&prop, 0));
  std::printf("%s: %d SMs, L2 %d MB; %zu KB per SM (%.1f MB total), idle %llu us, %d trials\n",
              prop.name, sms, prop.l2CacheSize >> 20, region >> 10, sms * region / 1e6,
              static_cast<unsigned long long>(idle_ns / 1000), trials);
  unsigned char* data;
  uint32_t* flush;
  int64_t* out;
  const size_t flush_bytes = size_t{160} << 20;
  CHECK(cudaMalloc(&data, sms * region));
  CHECK(cudaMalloc(&flush, flush_bytes));
  CHECK(cudaMalloc(&out, sms * sizeof(int64_t)));
  fill<<<4 * sms, 256>>>(reinterpret_cast<uint32_t*>(data), sms * region / 4, 7u);
  const int smem = kStreamSmem;
  CHECK(cudaFuncSetAttribute(stream, cudaFuncAttributeMaxDynamicSharedMemorySize, smem));
  struct Mode { const char* name; int mode; size_t ahead; int hint; int slots; uint32_t piece; };
  constexpr uint32_t K4 = 4096, K16 = 16384, K32 = 32768;
  std::vector<Mode> modes = {
      {"no prefetch, evict_first", 0, 0, 1, 4, K4},
      {"no prefetch, no hint", 0, 0, 0, 4, K4},
      {"bulk prefetch 1/4 region", 1, region / 4, 1, 4, K4},
      {"bulk prefetch 1/2 region", 1, region / 2, 1, 4, K4},
      {"bulk prefetch 1/2 region, no hint", 1, region / 2, 0, 4, K4},
      {"line prefetch 1/2 region", 2, region / 2, 1, 4, K4},
      {"bulk prefetch whole region", 1, region, 1, 4, K4},
      // ring depth and copy size, no prefetch / all in L2
      {"no prefetch, 16 KB copies", 0, 0, 1, 4, K16},
      {"no prefetch, 32 KB copies", 0, 0, 1, 4, K32},
      {"no prefetch, 2 slots", 0, 0, 1, 2, K4},
      {"no prefetch, 6 slots", 0, 0, 1, 6, K4},
      {"whole region in L2, 2 slots", 1, region, 1, 2, K4},
      {"whole region in L2, 6 slots", 1, region, 1, 6, K4},
      {"whole region in L2, 32 KB copies", 1, region, 1, 4, K32},
  };
  std::vector<int64_t> host(sms);
  for (const Mode& m : modes) {
    std::vector<double> worst, mean;
    for (int t = 0; t < trials + 2; ++t) {
      fill<<<4 * sms, 256>>>(flush, flush_bytes / 4, t);  // evict everything from L2
      stream<<<sms, 32, smem>>>(data, region, m.ahead, m.mode, m.hint, idle_ns, m.slots, m.piece,
                                out);
      CHECK(cudaGetLastError());
      CHECK(cudaMemcpy(host.data(), out, sms * sizeof(int64_t), cudaMemcpyDeviceToHost));
      if (t < 2) continue;  // warm-up
      double s = 0, w = 0;
      for (int64_t v : host) { s += v; w = std::max(w, static_cast<double>(v)); }
      worst.push_back(w / 1e3);
      mean.push_back(s / sms / 1e3);
    }
    std::sort(worst.begin(), worst.end());
    std::sort(mean.begin(), mean.end());
    const double wm = worst[worst.size() / 2], mm = mean[mean.size() / 2];
    std::printf("%-36s stream: slowest block %7.2f us, mean %7.2f us -> %.2f TB/s\n", m.name, wm,
                mm, sms * region / (wm * 1e-6) / 1e12);
  }
  CHECK(cudaFree(data));
  CHECK(cudaFree(flush));
  CHECK(cudaFree(out));
  return 0;
}
