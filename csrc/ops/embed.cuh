// EMBED: resid[0][b, col0:col0+n] = embed[tokens[b], col0:col0+n] for every batch row b;
// with copy, the same into resid[1].
#pragma once
#include "../common.cuh"

namespace mk {
struct EmbedOp {
  // Returns an error code (ERR_NONE on success).
  __device__ static int run(const KernelArgs& a, const int32_t* ins) {
    const int col0 = ins[W_EMBED_COL0], n = ins[W_EMBED_NCOLS];
    // Also into resid[1] (isa.py, ATTN_OPROJ): -DMK_FUSE_OPROJ=1 builds only, as DOWN's copy.
    const bool copy = kFuseOproj && ins[W_EMBED_COPY] != 0;
    int err = ERR_NONE;
    for (int i = threadIdx.x; i < a.B * n; i += kConsumerThreads) {
      const int b = i / n, c = col0 + (i - b * n);
      const int64_t tok = a.tokens[b];
      if (tok < 0 || tok >= a.V) { err = ERR_BAD_TOKEN; continue; }
      const float x = __bfloat162float(a.embed[static_cast<size_t>(tok) * a.d + c]);
      a.resid[static_cast<size_t>(b) * a.d + c] = x;
      if (copy) a.resid[static_cast<size_t>(a.B + b) * a.d + c] = x;
    }
    return err;
  }
};
}  // namespace mk
