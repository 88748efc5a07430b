// Host side of the interpreter: launch configuration and capability queries. No torch here:
// csrc/binding.cpp is the only file that speaks torch.
#include <cuda_runtime.h>
#include "interpreter.cuh"

namespace mk {

size_t smem_bytes() { return SmemLayout::total; }
int threads_per_block() { return kThreads; }

static cudaError_t configure() {
  static cudaError_t status = cudaFuncSetAttribute(
      megakernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(SmemLayout::total));
  return status;
}

int max_blocks_per_sm() {
  if (configure() != cudaSuccess) return 0;
  int blocks = 0;
  if (cudaOccupancyMaxActiveBlocksPerMultiprocessor(&blocks, megakernel, kThreads,
                                                    SmemLayout::total) != cudaSuccess)
    return 0;
  return blocks;
}

int launch(const KernelArgs& args, int num_sms, void* stream) {
  cudaError_t err = configure();
  if (err != cudaSuccess) return err;
  megakernel<<<num_sms, kThreads, SmemLayout::total, static_cast<cudaStream_t>(stream)>>>(args);
  return cudaGetLastError();
}

}  // namespace mk
