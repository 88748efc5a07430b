// GATEUP epilogue: act[l][b, (row0+r)/2] = silu(gate) * up for packed row pairs (r, r+1).
// kMlpBf16 at tensor-core batches: as bf16, [B, I] at the start of the layer's slab (DOWN
// rounds its input to bf16 for the MMA anyway; its staging then moves half the bytes).
#pragma once
#include "../common.cuh"
#include "../matvec.cuh"

namespace mk {
struct GateUpOp {
  __device__ static int epilogue(const KernelArgs& a, const int32_t* ins, const float* acc) {
    const int l = ins[W_LAYER], row0 = ins[W_GATEUP_ROW0], n = ins[W_GATEUP_NROWS];
    float* act = a.act + static_cast<size_t>(l) * a.B * a.I;
    const bool half = kMlpBf16 && tc_ntiles(a.B) > 0;
    for (int i = threadIdx.x; i < (n / 2) * a.B; i += kConsumerThreads) {
      const int pr = i / a.B, b = i - pr * a.B;
      const float gate = acc[(2 * pr) * a.B + b], up = acc[(2 * pr + 1) * a.B + b];
      const float h = gate / (1.f + expf(-gate)) * up;
      const size_t at = static_cast<size_t>(b) * a.I + row0 / 2 + pr;
      if (half) reinterpret_cast<__nv_bfloat16*>(act)[at] = __float2bfloat16(h);
      else act[at] = h;
    }
    return ERR_NONE;
  }
};
}  // namespace mk
