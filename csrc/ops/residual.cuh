// OPROJ and DOWN epilogue: out[:, row0+i] = resid_in[:, row0+i] + acc[i, :].
// OPROJ: resid[2l] -> resid[2l+1]; DOWN: resid[2l+1] -> resid[2l+2].
#pragma once
#include "../common.cuh"

namespace mk {
struct ResidualOp {
  __device__ static int epilogue(const KernelArgs& a, const int32_t* ins, const float* acc) {
    const int l = ins[W_LAYER], row0 = ins[W_OPROJ_ROW0], n = ins[W_OPROJ_NROWS];
    const int src = ins[W_OPCODE] == OP_OPROJ ? 2 * l : 2 * l + 1;
    const size_t Bd = static_cast<size_t>(a.B) * a.d;
    const float* in = a.resid + src * Bd;
    float* out = a.resid + (src + 1) * Bd;
    for (int i = threadIdx.x; i < n * a.B; i += kConsumerThreads) {
      const int r = i / a.B, b = i - r * a.B;
      const size_t o = static_cast<size_t>(b) * a.d + row0 + r;
      out[o] = ldcg(in + o) + acc[i];
    }
    return ERR_NONE;
  }
};
}  // namespace mk
