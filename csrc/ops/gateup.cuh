// GATEUP epilogue: act[l][b, (row0+r)/2] = silu(gate) * up for packed row pairs (r, r+1).
#pragma once
#include "../common.cuh"

namespace mk {
struct GateUpOp {
  __device__ static int epilogue(const KernelArgs& a, const int32_t* ins, const float* acc) {
    const int l = ins[W_LAYER], row0 = ins[W_GATEUP_ROW0], n = ins[W_GATEUP_NROWS];
    float* act = a.act + static_cast<size_t>(l) * a.B * a.I;
    for (int i = threadIdx.x; i < (n / 2) * a.B; i += kConsumerThreads) {
      const int pr = i / a.B, b = i - pr * a.B;
      const float gate = acc[(2 * pr) * a.B + b], up = acc[(2 * pr + 1) * a.B + b];
      act[static_cast<size_t>(b) * a.I + row0 / 2 + pr] = gate / (1.f + expf(-gate)) * up;
    }
    return ERR_NONE;
  }
};
}  // namespace mk
