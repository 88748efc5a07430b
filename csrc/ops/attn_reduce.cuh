// ATTN_REDUCE: merge the NS flash-decoding partials of the G q heads of kv head g, batch
// row b: attn[l, b, h*D + i] = sum_s exp(lse_s - LSE) o_s[i], LSE = logsumexp_s lse_s.
#pragma once
#include "../common.cuh"

namespace mk {
struct AttnReduceOp {
  __device__ static int run(const KernelArgs& a, const int32_t* ins) {
    const int l = ins[W_LAYER], b = ins[W_ATTN_REDUCE_B], g = ins[W_ATTN_REDUCE_KV_HEAD];
    const int G = a.H / a.Hkv, D = a.D, NS = a.NS;
    for (int i = threadIdx.x; i < G * D; i += kConsumerThreads) {
      const int h = g * G + i / D, dim = i % D;
      const size_t head = (static_cast<size_t>(l) * a.B + b) * a.H + h;
      const float* lse = a.lse + head * NS;
      float m = -INFINITY;
      for (int s = 0; s < NS; ++s) m = fmaxf(m, ldcg(lse + s));
      float wsum = 0.f, o = 0.f;
      if (m != -INFINITY) {
        for (int s = 0; s < NS; ++s) {
          const float w = expf(ldcg(lse + s) - m);
          wsum += w;
          o += w * ldcg(a.o_part + (head * NS + s) * D + dim);
        }
        o /= wsum;
      }
      a.attn[(static_cast<size_t>(l) * a.B + b) * a.H * D + static_cast<size_t>(h) * D + dim] = o;
    }
    return ERR_NONE;
  }
};
}  // namespace mk
