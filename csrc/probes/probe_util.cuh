// What the probes share (l2_prefetch.cu, hbm_stream.cu, load_latency.cu,
// staging_latency.cu): error checks, the clock, the device banner, one warp streaming pages
// from global memory through a ring of 32 KB shared-memory slots with the megakernel's bulk
// copies (cp.async.bulk on mbarriers), as its loader does, and for the latency probes that
// stream as a block's warp 0 and the trial loop around it (StreamTrials).
#pragma once
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <vector>

#define CHECK(x)                                                                    \
  do {                                                                              \
    cudaError_t e = (x);                                                            \
    if (e != cudaSuccess) {                                                         \
      std::fprintf(stderr, "%s:%d %s: %s\n", __FILE__, __LINE__, #x, cudaGetErrorString(e)); \
      std::exit(1);                                                                 \
    }                                                                               \
  } while (0)

namespace probe {

constexpr int kMaxSlots = 6;
constexpr uint32_t kPage = 32 * 1024;
// Dynamic shared memory of a stream_pages kernel: the slots, then their mbarriers.
constexpr int kStreamSmem = kMaxSlots * kPage + kMaxSlots * 8;

__device__ __forceinline__ uint64_t now() {
  uint64_t t;
  asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
  return t;
}
__device__ __forceinline__ uint32_t sa(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// One warp: pages 0 .. pages-1, page i from src_of(i), into `slots` slots of smem, each
// page as kPage / piece bulk copies (with the L2 `policy` when `hinted`). Returns once the
// last page has landed.
template <typename SrcOf>
__device__ void stream_pages(unsigned char* smem, uint32_t pages, int slots, uint32_t piece,
                             bool hinted, uint64_t policy, SrcOf src_of) {
  uint64_t* full = reinterpret_cast<uint64_t*>(smem + kMaxSlots * kPage);
  const int lane = threadIdx.x & 31;
  if (lane == 0) {
    for (int s = 0; s < slots; ++s)
      asm volatile("mbarrier.init.shared::cta.b64 [%0], 1;" :: "r"(sa(full + s)));
    asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
  }
  __syncwarp();
  for (uint32_t it = 0; it < pages + slots; ++it) {
    if (it >= static_cast<uint32_t>(slots)) {  // wait for page it - slots: its slot is free
      const uint32_t w = it - slots, slot = w % slots, parity = (w / slots) & 1;
      uint32_t done = 0;
      while (!done)
        asm volatile(
            "{ .reg .pred p; mbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2; "
            "selp.u32 %0, 1, 0, p; }"
            : "=r"(done) : "r"(sa(full + slot)), "r"(parity) : "memory");
    }
    if (it >= pages) continue;
    const uint32_t slot = it % slots;
    unsigned char* dst = smem + slot * kPage;
    const unsigned char* src = src_of(it);
    if (lane == 0)
      asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;"
                   :: "r"(sa(full + slot)), "r"(kPage) : "memory");
    __syncwarp();
    for (uint32_t q = lane; q < kPage / piece; q += 32) {
      if (hinted)
        asm volatile(
            "cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes.L2::cache_hint"
            " [%0], [%1], %2, [%3], %4;"
            :: "r"(sa(dst + q * piece)), "l"(src + q * piece), "r"(piece), "r"(sa(full + slot)),
               "l"(policy) : "memory");
      else
        asm volatile(
            "cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes"
            " [%0], [%1], %2, [%3];"
            :: "r"(sa(dst + q * piece)), "l"(src + q * piece), "r"(piece), "r"(sa(full + slot))
            : "memory");
    }
  }
}

// Probes of a consumer's latency under the weight stream (load_latency.cu,
// staging_latency.cu): each block's warp 0 streams its share of a weight buffer through
// `slots` ring slots (none: slots 0), interleaved across blocks as the kernel's pages, while
// the other warps time something. out[4 * block] = {stream start, stream end, measured
// value x 1000, count}; warp 0 writes the first two and sets `done` when the stream ends.
constexpr uint32_t kStreamKbPerSm = 4096;

__device__ void stream_role(unsigned char* smem, const unsigned char* data, uint32_t pages,
                            int slots, int64_t* out, volatile int& done) {
  const uint64_t t1 = now();
  if (slots > 0) {
    uint64_t policy;
    asm volatile("createpolicy.fractional.L2::evict_first.b64 %0, 1.0;" : "=l"(policy));
    stream_pages(smem, pages, slots, 4096, true, policy, [&](uint32_t it) {
      return data + (static_cast<size_t>(it) * gridDim.x + blockIdx.x) * kPage;
    });
  }
  if ((threadIdx.x & 31) == 0) {
    out[4 * blockIdx.x] = static_cast<int64_t>(t1);
    out[4 * blockIdx.x + 1] = static_cast<int64_t>(now());
    done = 1;
  }
}

// Rewrites n words (fills a buffer, or evicts L2 between trials by writing a large one).
__global__ void fill(uint32_t* p, size_t n, uint32_t seed) {
  for (size_t i = blockIdx.x * blockDim.x + threadIdx.x; i < n; i += gridDim.x * blockDim.x)
    p[i] = static_cast<uint32_t>(i) * 2654435761u ^ seed;
}

// Host side of those probes: the weight buffer (kStreamKbPerSm per SM, filled), a 160 MB
// buffer rewritten before every trial to evict it from L2, and the out array.
struct StreamTrials {
  int sms;
  size_t bytes;
  unsigned char* data = nullptr;
  uint32_t* flush = nullptr;
  int64_t* out = nullptr;
  static constexpr size_t kFlushBytes = size_t{160} << 20;

  explicit StreamTrials(int n) : sms(n), bytes(static_cast<size_t>(n) * kStreamKbPerSm * 1024) {
    CHECK(cudaMalloc(&data, bytes));
    CHECK(cudaMalloc(&flush, kFlushBytes));
    CHECK(cudaMalloc(&out, 4 * sms * sizeof(int64_t)));
    fill<<<4 * sms, 256>>>(reinterpret_cast<uint32_t*>(data), bytes / 4, 7u);
  }
  ~StreamTrials() {
    cudaFree(data);
    cudaFree(flush);
    cudaFree(out);
  }
  uint32_t pages() const { return kStreamKbPerSm * 1024 / kPage; }

  struct Result {
    double wall_us;   // the stream's span, first block's start to last block's end
    double tbps;      // the launched blocks' bytes over that span
    double value_ns;  // median over blocks of the measured value
    double quiet_ns;  // the same over the blocks that were told not to stream (0 if none)
  };
  // trials + 2 launches (the first two warm up), each after an L2 flush; medians over trials.
  // A block that did not stream while others did marks itself with a stream start of -1: its
  // value counts in quiet_ns, not in value_ns, wall_us or tbps.
  template <typename Launch>
  Result run(int trials, Launch launch) {
    std::vector<int64_t> host(4 * sms);
    std::vector<double> wall, tbps, value, quiet;
    for (int t = 0; t < trials + 2; ++t) {
      fill<<<4 * sms, 256>>>(flush, kFlushBytes / 4, t);
      CHECK(cudaMemset(out, 0, 4 * sms * sizeof(int64_t)));  // blocks of a smaller grid stay 0
      launch();
      CHECK(cudaGetLastError());
      CHECK(cudaMemcpy(host.data(), out, host.size() * sizeof(int64_t), cudaMemcpyDeviceToHost));
      if (t < 2) continue;
      int64_t first = INT64_MAX, last = 0;
      std::vector<double> per_block, per_quiet;
      for (int b = 0; b < sms; ++b) {
        if (host[4 * b + 1] == 0) continue;  // no such block in this launch's grid
        if (host[4 * b] < 0) {
          per_quiet.push_back(host[4 * b + 2] / 1e3);
          continue;
        }
        first = std::min(first, host[4 * b]);
        last = std::max(last, host[4 * b + 1]);
        per_block.push_back(host[4 * b + 2] / 1e3);
      }
      std::sort(per_block.begin(), per_block.end());
      wall.push_back((last - first) / 1e3);
      tbps.push_back(per_block.size() * kStreamKbPerSm * 1024.0 / (last - first) / 1e3);
      value.push_back(per_block[per_block.size() / 2]);
      std::sort(per_quiet.begin(), per_quiet.end());
      quiet.push_back(per_quiet.empty() ? 0.0 : per_quiet[per_quiet.size() / 2]);
    }
    std::sort(wall.begin(), wall.end());
    std::sort(tbps.begin(), tbps.end());
    std::sort(value.begin(), value.end());
    std::sort(quiet.begin(), quiet.end());
    return {wall[wall.size() / 2], tbps[tbps.size() / 2], value[value.size() / 2],
            quiet[quiet.size() / 2]};
  }
};

// The device's SM count, after printing its name, SM count, L2 size and the trial count.
inline int sms_with_banner(int trials) {
  int sms = 0;
  CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, 0));
  cudaDeviceProp prop;
  CHECK(cudaGetDeviceProperties(&prop, 0));
  std::printf("%s: %d SMs, L2 %d MB, %d trials\n", prop.name, sms, prop.l2CacheSize >> 20,
              trials);
  return sms;
}

}  // namespace probe
