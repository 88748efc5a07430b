// Probe: how fast can one loader warp per SM stream weights from HBM into shared memory, and
// what does the rate depend on? bench/NOTES.md (session 7) measured 2.65 TB/s for the
// kernel's pattern (each SM its own contiguous 512 KB, 32 KB pages of 4 KB bulk copies,
// evict-first) against 2.95 TB/s read by a plain kernel over a large buffer; the 1B step
// spends ~0.93 ms of its 1.18 ms streaming at that rate. This separates the candidates:
//   - layout: each SM's pages contiguous (the kernel's row slices) or page-interleaved
//     across SMs (page p of SM s at (p * sms + s) * 32 KB: at any moment the SMs read one
//     contiguous window, as a grid-stride kernel does);
//   - stream length (ramp-up and tail against the steady state);
//   - L2 policy of the copies; ring depth; copy size;
//   - a plain vectorized read kernel (all threads, ld.global.nc 16 B) over the same bytes.
// Between trials a 160 MB buffer is rewritten so no trial starts with a warm L2. Per row:
// median over trials of the wall time (first block's start to last block's end, from
// %globaltimer) and of the mean block's stream time, and the TB/s the wall time implies.
//
//   nvcc -O3 -std=c++17 -gencode=arch=compute_90a,code=sm_90a csrc/probes/hbm_stream.cu \
//        -o /tmp/hbmprobe && /tmp/hbmprobe [trials=15]
#include <algorithm>
#include <vector>

#include "probe_util.cuh"

namespace {

using namespace probe;

// hint: 0 none, 1 evict_first, 2 evict_normal, 3 evict_last, 4 evict_unchanged
// interleave: 0 contiguous regions, 1 pages interleaved across blocks
__global__ void __launch_bounds__(32, 1)
stream(const unsigned char* data, uint32_t pages, int interleave, int hint, int slots,
       uint32_t piece, int64_t* out) {
  extern __shared__ __align__(128) unsigned char smem[];
  uint64_t policy = 0;
  if (hint == 1) asm volatile("createpolicy.fractional.L2::evict_first.b64 %0, 1.0;" : "=l"(policy));
  if (hint == 2) asm volatile("createpolicy.fractional.L2::evict_normal.b64 %0, 1.0;" : "=l"(policy));
  if (hint == 3) asm volatile("createpolicy.fractional.L2::evict_last.b64 %0, 1.0;" : "=l"(policy));
  if (hint == 4) asm volatile("createpolicy.fractional.L2::evict_unchanged.b64 %0, 1.0;" : "=l"(policy));
  const uint64_t t1 = now();
  stream_pages(smem, pages, slots, piece, hint != 0, policy, [&](uint32_t it) {
    const size_t page = interleave ? static_cast<size_t>(it) * gridDim.x + blockIdx.x
                                   : static_cast<size_t>(blockIdx.x) * pages + it;
    return data + page * kPage;
  });
  if (threadIdx.x == 0) {
    out[2 * blockIdx.x] = static_cast<int64_t>(t1);
    out[2 * blockIdx.x + 1] = static_cast<int64_t>(now());
  }
}

// Plain read: every thread loads 16-byte vectors grid-stride (non-coherent path), folds them
// into one word so the loads are live.
__global__ void read_ldg(const uint4* p, size_t n, uint32_t* sink, int64_t* out) {
  const uint64_t t1 = now();
  uint32_t x = 0;
  for (size_t i = blockIdx.x * blockDim.x + threadIdx.x; i < n; i += gridDim.x * blockDim.x) {
    const uint4 v = __ldg(p + i);
    x ^= v.x ^ v.y ^ v.z ^ v.w;
  }
  if (x == 0x9e3779b9u) sink[0] = x;
  __syncthreads();
  if (threadIdx.x == 0) {
    out[2 * blockIdx.x] = static_cast<int64_t>(t1);
    out[2 * blockIdx.x + 1] = static_cast<int64_t>(now());
  }
}

}  // namespace

int main(int argc, char** argv) {
  const int trials = argc > 1 ? std::atoi(argv[1]) : 15;
  const int sms = sms_with_banner(trials);
  const size_t max_bytes = size_t{1} << 30;  // 1 GB
  unsigned char* data;
  uint32_t* flush;
  uint32_t* sink;
  int64_t* out;
  const size_t flush_bytes = size_t{160} << 20;
  const int max_blocks = 8 * sms;
  CHECK(cudaMalloc(&data, max_bytes));
  CHECK(cudaMalloc(&flush, flush_bytes));
  CHECK(cudaMalloc(&sink, 4));
  CHECK(cudaMalloc(&out, 2 * max_blocks * sizeof(int64_t)));
  fill<<<4 * sms, 256>>>(reinterpret_cast<uint32_t*>(data), max_bytes / 4, 7u);
  const int smem = kStreamSmem;
  CHECK(cudaFuncSetAttribute(stream, cudaFuncAttributeMaxDynamicSharedMemorySize, smem));
  // kind 0: bulk stream (one warp per SM); 1: plain read kernel with `slots` blocks per SM.
  struct Row { const char* name; int kind; uint32_t kb_per_sm; int interleave, hint, slots;
               uint32_t piece; };
  constexpr uint32_t K4 = 4096, K32 = 32768;
  const std::vector<Row> rows = {
      {"bulk 512 KB/SM contiguous, evict_first", 0, 512, 0, 1, 4, K4},
      {"bulk 512 KB/SM interleaved, evict_first", 0, 512, 1, 1, 4, K4},
      {"bulk 512 KB/SM contiguous, no hint", 0, 512, 0, 0, 4, K4},
      {"bulk 512 KB/SM interleaved, no hint", 0, 512, 1, 0, 4, K4},
      {"bulk 512 KB/SM contiguous, evict_normal", 0, 512, 0, 2, 4, K4},
      {"bulk 512 KB/SM contiguous, evict_unchanged", 0, 512, 0, 4, 4, K4},
      {"bulk 512 KB/SM interleaved, 32 KB copies", 0, 512, 1, 1, 4, K32},
      {"bulk 512 KB/SM interleaved, 6 slots", 0, 512, 1, 1, 6, K4},
      {"bulk 4 MB/SM contiguous, evict_first", 0, 4096, 0, 1, 4, K4},
      {"bulk 4 MB/SM interleaved, evict_first", 0, 4096, 1, 1, 4, K4},
      {"bulk 4 MB/SM interleaved, 6 slots", 0, 4096, 1, 1, 6, K4},
      {"bulk 4 MB/SM interleaved, no hint", 0, 4096, 1, 0, 4, K4},
      {"ldg 512 KB/SM, 4 blocks x 256 per SM", 1, 512, 0, 0, 4, 0},
      {"ldg 4 MB/SM, 4 blocks x 256 per SM", 1, 4096, 0, 0, 4, 0},
      {"ldg 4 MB/SM, 8 blocks x 256 per SM", 1, 4096, 0, 0, 8, 0},
  };
  std::vector<int64_t> host(2 * max_blocks);
  for (const Row& r : rows) {
    const size_t bytes = static_cast<size_t>(sms) * r.kb_per_sm * 1024;
    if (bytes > max_bytes) continue;
    const int blocks = r.kind == 0 ? sms : r.slots * sms;
    std::vector<double> wall, mean;
    for (int t = 0; t < trials + 2; ++t) {
      fill<<<4 * sms, 256>>>(flush, flush_bytes / 4, t);  // evict everything from L2
      if (r.kind == 0)
        stream<<<sms, 32, smem>>>(data, r.kb_per_sm * 1024 / kPage, r.interleave, r.hint,
                                  r.slots, r.piece, out);
      else
        read_ldg<<<blocks, 256>>>(reinterpret_cast<const uint4*>(data), bytes / 16, sink, out);
      CHECK(cudaGetLastError());
      CHECK(cudaMemcpy(host.data(), out, 2 * blocks * sizeof(int64_t), cudaMemcpyDeviceToHost));
      if (t < 2) continue;  // warm-up
      int64_t first = host[0], last = host[1];
      double s = 0;
      for (int b = 0; b < blocks; ++b) {
        first = std::min(first, host[2 * b]);
        last = std::max(last, host[2 * b + 1]);
        s += static_cast<double>(host[2 * b + 1] - host[2 * b]);
      }
      wall.push_back((last - first) / 1e3);
      mean.push_back(s / blocks / 1e3);
    }
    std::sort(wall.begin(), wall.end());
    std::sort(mean.begin(), mean.end());
    const double w = wall[wall.size() / 2], m = mean[mean.size() / 2];
    std::printf("%-46s %7.1f MB: wall %8.2f us, mean block %8.2f us -> %.3f TB/s\n", r.name,
                bytes / 1e6, w, m, bytes / (w * 1e-6) / 1e12);
  }
  CHECK(cudaFree(data));
  CHECK(cudaFree(flush));
  CHECK(cudaFree(sink));
  CHECK(cudaFree(out));
  return 0;
}
