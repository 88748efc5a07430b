// Host side of the interpreter: launch configuration and capability queries. No torch here:
// csrc/binding.cpp is the only file that speaks torch.
#include <cuda_runtime.h>
#include "interpreter.cuh"

namespace mk {

size_t smem_bytes() { return SmemLayout::total; }
int threads_per_block() { return kThreads; }

static cudaError_t configure() {
  static cudaError_t status = [] {
    const int bytes = static_cast<int>(SmemLayout::total);
    cudaError_t e = cudaFuncSetAttribute(megakernel<false>,
                                         cudaFuncAttributeMaxDynamicSharedMemorySize, bytes);
    if (e != cudaSuccess) return e;
    return cudaFuncSetAttribute(megakernel<true>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                bytes);
  }();
  return status;
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
