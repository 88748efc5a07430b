// What the probes share (l2_prefetch.cu, hbm_stream.cu, load_latency.cu): error checks, the
// clock, the device banner, and one warp streaming pages from global memory through a ring
// of 32 KB shared-memory slots with the megakernel's bulk copies (cp.async.bulk on
// mbarriers), as its loader does.
#pragma once
#include <cuda_runtime.h>

#include <cstdint>
#include <cstdio>
#include <cstdlib>

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

// Rewrites n words (fills a buffer, or evicts L2 between trials by writing a large one).
__global__ void fill(uint32_t* p, size_t n, uint32_t seed) {
  for (size_t i = blockIdx.x * blockDim.x + threadIdx.x; i < n; i += gridDim.x * blockDim.x)
    p[i] = static_cast<uint32_t>(i) * 2654435761u ^ seed;
}

}  // namespace probe
