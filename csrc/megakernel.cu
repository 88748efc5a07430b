// Host side of the interpreter: launch configuration and capability queries. No torch here:
// csrc/binding.cpp is the only file that speaks torch.
#include <atomic>
#include <cstdio>
#include <cuda_runtime.h>
#include "interpreter.cuh"

namespace mk {

size_t smem_bytes() { return SmemLayout::total; }
int threads_per_block() { return kThreads; }
bool claims_compiled() { return kClaims; }
bool ll_q_compiled() { return kLlQ; }
bool ll_x_compiled() { return kLlX; }
bool ll_partials_compiled() { return kLlPartials; }

// The shared-memory opt-in is a per-device function attribute: set it once per device
// (tensor parallelism launches on several GPUs from one process).
static cudaError_t configure() {
  constexpr int kMaxDevices = 64;
  static std::atomic<int> status[kMaxDevices];  // 0: not yet, 1: ok, else cudaError_t + 2
  int dev = 0;
  cudaError_t e = cudaGetDevice(&dev);
  if (e != cudaSuccess) return e;
  if (dev >= kMaxDevices) return cudaErrorInvalidDevice;
  const int known = status[dev].load();
  if (known != 0) return known == 1 ? cudaSuccess : static_cast<cudaError_t>(known - 2);
  const int bytes = static_cast<int>(SmemLayout::total);
  e = cudaFuncSetAttribute(megakernel<false>, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes);
  if (e == cudaSuccess)
    e = cudaFuncSetAttribute(megakernel<true>, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes);
  // kWarpgroups: the consumers' setmaxnreg.inc waits until the CTA's pool holds what it asks
  // for, which the loader's .dec frees only if the kernel launched at kLaunchRegs a thread
  // (else it would wait forever): refuse any other count.
  for (int t = 0; kWarpgroups && e == cudaSuccess && t < 2; ++t) {
    cudaFuncAttributes attr{};
    e = cudaFuncGetAttributes(&attr, t ? megakernel<true> : megakernel<false>);
    if (e == cudaSuccess && attr.numRegs != kLaunchRegs) {
      std::fprintf(stderr, "megakernel: -DMK_WARPGROUPS=1 needs the kernel at %d registers a "
                   "thread at launch (its setmaxnreg budgets), ptxas gave it %d\n",
                   kLaunchRegs, attr.numRegs);
      e = cudaErrorInvalidConfiguration;
    }
  }
  status[dev].store(e == cudaSuccess ? 1 : static_cast<int>(e) + 2);
  return e;
}

int max_blocks_per_sm() {
  if (configure() != cudaSuccess) return 0;
  int blocks = 0;
  if (cudaOccupancyMaxActiveBlocksPerMultiprocessor(&blocks, megakernel<false>, kThreads,
                                                    SmemLayout::total) != cudaSuccess)
    return 0;
  return blocks;
}

int launch(const KernelArgs& args, int num_sms, void* stream) {
  cudaError_t err = configure();
  if (err != cudaSuccess) return err;
  // The timing variant is its own instantiation: without a timing buffer no stamp is taken.
  auto kernel = args.timing ? megakernel<true> : megakernel<false>;
  kernel<<<num_sms, kThreads, SmemLayout::total, static_cast<cudaStream_t>(stream)>>>(args);
  return cudaGetLastError();
}

}  // namespace mk
