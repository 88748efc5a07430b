// GATEUP epilogue: act[l][b, (row0+r)/2] = silu(gate) * up for packed row pairs (r, r+1);
// copy > 0 (isa.py): resid[2l+1][:, c0:c0+nc] also into resid[2l+2] and (copy 2)
// resid[2l+3], the initial values of the K-sliced DOWN adds and the next ATTN_OPROJ's.
#pragma once
#include "../common.cuh"

namespace mk {
struct GateUpOp {
  // Element i (batch row i / nc, column c0 + i % nc) of the copied range, in resid[2l+1].
  __device__ static float* copy_src(const KernelArgs& a, const int32_t* ins, int i) {
    const int nc = ins[W_GATEUP_SUM_NCOLS], b = i / nc;
    return a.resid + (static_cast<size_t>(2 * ins[W_LAYER] + 1) * a.B + b) * a.d +
           ins[W_GATEUP_SUM_COL0] + (i - b * nc);
  }

  // pre: this thread's first copied element, loaded with the first activation chunk.
  __device__ static int epilogue(const KernelArgs& a, const int32_t* ins, const float* acc,
                                 float pre) {
    const int l = ins[W_LAYER], row0 = ins[W_GATEUP_ROW0], n = ins[W_GATEUP_NROWS];
    float* act = a.act + static_cast<size_t>(l) * a.B * a.I;
    for (int i = threadIdx.x; i < (n / 2) * a.B; i += kConsumerThreads) {
      const int pr = i / a.B, b = i - pr * a.B;
      const float gate = acc[(2 * pr) * a.B + b], up = acc[(2 * pr + 1) * a.B + b];
      act[static_cast<size_t>(b) * a.I + row0 / 2 + pr] = gate / (1.f + expf(-gate)) * up;
    }
    const int copy = ins[W_GATEUP_COPY];
    if (copy) {  // matvec_valid checked the range, and level 2l+3 for copy 2
      const size_t Bd = static_cast<size_t>(a.B) * a.d;
      for (int i = threadIdx.x; i < ins[W_GATEUP_SUM_NCOLS] * a.B; i += kConsumerThreads) {
        float* src = copy_src(a, ins, i);
        const float x = i == threadIdx.x ? pre : ldcg(src);
        src[Bd] = x;
        if (copy > 1) src[2 * Bd] = x;
      }
    }
    return ERR_NONE;
  }
};
}  // namespace mk
