// ARGMAX: out_tokens[b] = index of the max over the NLM LM-head partials (lowest on ties).
#pragma once
#include "lmhead.cuh"

namespace mk {
struct ArgmaxOp {
  __device__ static int run(const KernelArgs& a, const int32_t* ins) {
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    for (int b = warp; b < a.B; b += kConsumerWarps) {
      float bv = -INFINITY;
      int bi = 0x7fffffff;
      for (int s = lane; s < a.NLM; s += 32) {
        const size_t o = static_cast<size_t>(b) * a.NLM + s;
        const float v = ldcg(a.amax_val + o);
        const int i = __ldcg(a.amax_idx + o);
        if (argmax_better(v, i, bv, bi)) { bv = v; bi = i; }
      }
      warp_argmax(bv, bi);
      if (lane == 0) a.out_tokens[b] = bi;
    }
    return ERR_NONE;
  }
};
}  // namespace mk
