// LMHEAD epilogue: logits[:, row0:row0+n] = acc, plus this slice's argmax per batch row
// (lowest index on ties, NaN never wins) into amax_val/amax_idx[b, slot]. row0 and slot are
// global (vocab rows); under tp > 1 (all_ranks) both go to every rank's buffers.
#pragma once
#include "../common.cuh"
#include "residual.cuh"

namespace mk {

// (v, i) beats (bv, bi): larger value, or equal value and lower index.
__device__ __forceinline__ bool argmax_better(float v, int i, float bv, int bi) {
  return v > bv || (v == bv && i < bi);
}

__device__ __forceinline__ void warp_argmax(float& v, int& i) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) {
    const float ov = __shfl_xor_sync(0xffffffffu, v, o);
    const int oi = __shfl_xor_sync(0xffffffffu, i, o);
    if (argmax_better(ov, oi, v, i)) { v = ov; i = oi; }
  }
}

struct LmHeadOp {
  // red: >= 2 * kConsumerWarps floats of scratch.
  __device__ static int epilogue(const KernelArgs& a, const int32_t* ins, const float* acc,
                                 float* red) {
    const int row0 = ins[W_LMHEAD_ROW0], n = ins[W_LMHEAD_NROWS], slot = ins[W_LMHEAD_SLOT];
    const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
    const bool all = ins[W_ALL_RANKS] != 0;
    const int p0 = all ? first_peer(a) : a.rank, p1 = all ? end_peer(a) : a.rank + 1;
    for (int i = tid; i < n * a.B; i += kConsumerThreads) {
      const int b = i / n, r = i - b * n;  // batch-major, as ResidualOp's peer stores
      const float v = acc[r * a.B + b];
      const size_t o = static_cast<size_t>(b) * a.V + row0 + r;
      for (int p = p0; p < p1; ++p) (a.tp > 1 ? a.peers[p].logits : a.logits)[o] = v;
    }
    int* red_i = reinterpret_cast<int*>(red + kConsumerWarps);
    for (int b = 0; b < a.B; ++b) {
      float bv = -INFINITY;
      int bi = 0x7fffffff;
      for (int r = tid; r < n; r += kConsumerThreads) {
        const float v = acc[r * a.B + b];
        if (argmax_better(v, row0 + r, bv, bi)) { bv = v; bi = row0 + r; }
      }
      warp_argmax(bv, bi);
      if (lane == 0) { red[warp] = bv; red_i[warp] = bi; }
      consumer_sync();
      if (tid == 0) {
        for (int w = 1; w < kConsumerWarps; ++w)
          if (argmax_better(red[w], red_i[w], bv, bi)) { bv = red[w]; bi = red_i[w]; }
        for (int p = p0; p < p1; ++p) {
          float* val = a.tp > 1 ? a.peers[p].amax_val : a.amax_val;
          int32_t* idx = a.tp > 1 ? a.peers[p].amax_idx : a.amax_idx;
          val[static_cast<size_t>(b) * a.NLM + slot] = bv;
          idx[static_cast<size_t>(b) * a.NLM + slot] = bi;
        }
      }
      consumer_sync();
    }
    return ERR_NONE;
  }
};
}  // namespace mk
