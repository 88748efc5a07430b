// ATTN_REDUCE: merge the NS flash-decoding partials of the G q heads of kv head g, batch
// row b: attn[l, b, h*D + i] = sum_s exp(lse_s - LSE) o_s[i], LSE = logsumexp_s lse_s.
// Online over groups of kGroup splits whose loads are all issued before any is used: one
// L2 round trip per group, not one per split.
#pragma once
#include "../common.cuh"

namespace mk {
struct AttnReduceOp {
  static constexpr int kGroup = 8;

  __device__ static int run(const KernelArgs& a, const int32_t* ins) {
    const int l = ins[W_LAYER], b = ins[W_ATTN_REDUCE_B], g = ins[W_ATTN_REDUCE_KV_HEAD];
    const int G = a.H / a.Hkv, D = a.D, NS = a.NS;
    for (int i = threadIdx.x; i < G * D; i += kConsumerThreads) {
      const int h = g * G + i / D, dim = i % D;
      const size_t head = (static_cast<size_t>(l) * a.B + b) * a.H + h;
      const float* lse = a.lse + head * NS;
      const float* op = a.o_part + head * NS * D + dim;
      float m = -INFINITY, wsum = 0.f, o = 0.f;  // running max, sum of weights, weighted o
      for (int s0 = 0; s0 < NS; s0 += kGroup) {
        float ls[kGroup], os[kGroup];
#pragma unroll
        for (int j = 0; j < kGroup; ++j) {
          const bool in = s0 + j < NS;
          ls[j] = in ? ldcg(lse + s0 + j) : -INFINITY;
          os[j] = in ? ldcg(op + static_cast<size_t>(s0 + j) * D) : 0.f;
        }
        float mg = m;
#pragma unroll
        for (int j = 0; j < kGroup; ++j) mg = fmaxf(mg, ls[j]);
        if (mg == -INFINITY) continue;  // every split so far empty
        const float c = expf(m - mg);   // m == -inf: 0, and wsum, o are 0
        wsum *= c;
        o *= c;
#pragma unroll
        for (int j = 0; j < kGroup; ++j) {
          const float w = expf(ls[j] - mg);  // empty split: lse -inf, weight 0
          wsum += w;
          o += w * os[j];
        }
        m = mg;
      }
      a.attn[(static_cast<size_t>(l) * a.B + b) * a.H * D + static_cast<size_t>(h) * D + dim] =
          m == -INFINITY ? 0.f : o / wsum;
    }
    return ERR_NONE;
  }
};
}  // namespace mk
