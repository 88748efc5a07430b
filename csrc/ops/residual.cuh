// OPROJ and DOWN epilogue.
// tp == 1: out[:, row0+i] = resid_in[:, row0+i] + acc[i, :], with
//   OPROJ: resid[2l] -> resid[2l+1]; DOWN: resid[2l+1] -> resid[2l+2]. A K-sliced DOWN
//   (kn > 0) adds acc into resid[2l+2] atomically instead, onto the copy OPROJ (or, with
//   ATTN_OPROJ, GATEUP) stored there, and with copy into resid[2l+3] too (isa.py).
// tp > 1 (all_ranks): this rank's partial acc goes to part[level][rank][:, row0+i] on every
//   rank (peer stores over NVLink; the interpreter's system-scope signal publishes them), and
//   RESID_SUM later folds the partials of all ranks into the residual. Peer stores walk the
//   elements batch-major, so a warp's 32 stores to a peer are one contiguous 128-B run
//   (row-major order split them into B runs of 128/B bytes, each its own NVLink write).
#pragma once
#include "../common.cuh"

namespace mk {

// Destinations of an all-rank store: this rank's own buffers only under MODE_LOCAL_COMM.
__device__ __forceinline__ int first_peer(const KernelArgs& a) {
  return (a.mode & MODE_LOCAL_COMM) ? a.rank : 0;
}
__device__ __forceinline__ int end_peer(const KernelArgs& a) {
  return (a.mode & MODE_LOCAL_COMM) ? a.rank + 1 : a.tp;
}

struct ResidualOp {
  // The residual entry that element i (row i / B, batch row i % B) of the epilogue adds to;
  // null for an all-rank instruction (partials carry no residual).
  __device__ static float* residual_in(const KernelArgs& a, const int32_t* ins, int i) {
    if (ins[W_ALL_RANKS]) return nullptr;
    const int l = ins[W_LAYER], row0 = ins[W_OPROJ_ROW0];
    const int src = ins[W_OPCODE] == OP_OPROJ ? 2 * l : 2 * l + 1;
    const int r = i / a.B, b = i - r * a.B;
    return a.resid + (static_cast<size_t>(src) * a.B + b) * a.d + row0 + r;
  }

  // pre: this thread's first element's residual entry, loaded before the matvec. kLlX: a
  // DOWN also stores its output into x_ll[l] as flagged elements tagged epoch + 1.
  __device__ static int epilogue(const KernelArgs& a, const int32_t* ins, const float* acc,
                                 float pre, int epoch) {
    const int l = ins[W_LAYER], row0 = ins[W_OPROJ_ROW0], n = ins[W_OPROJ_NROWS];
    const int src = ins[W_OPCODE] == OP_OPROJ ? 2 * l : 2 * l + 1;
    const size_t Bd = static_cast<size_t>(a.B) * a.d;
    if (ins[W_ALL_RANKS]) {
      if (a.tp < 2) return ERR_BAD_INSTRUCTION;
      const size_t off = (static_cast<size_t>(src) * a.tp + a.rank) * Bd;
      for (int i = threadIdx.x; i < n * a.B; i += kConsumerThreads) {
        const int b = i / n, j = i - b * n;  // batch-major: one warp store, one peer segment
        const float v = acc[j * a.B + b];
        const size_t o = off + static_cast<size_t>(b) * a.d + row0 + j;
        for (int r = first_peer(a); r < end_peer(a); ++r) a.peers[r].part[o] = v;
      }
      return ERR_NONE;
    }
    const bool down = ins[W_OPCODE] == OP_DOWN;
    if (down && ins[W_DOWN_KN]) {  // a K slice's share of the sum
      const bool copy = ins[W_DOWN_COPY] != 0;  // also onto GATEUP's copy in resid[2l+3]
      for (int i = threadIdx.x; i < n * a.B; i += kConsumerThreads) {
        float* in = residual_in(a, ins, i);
        atomicAdd(in + Bd, acc[i]);  // no return value: a RED
        if (copy) atomicAdd(in + 2 * Bd, acc[i]);
      }
      return ERR_NONE;
    }
    // With copy also into resid[src + 2]: DOWN's the value ATTN_OPROJ adds to (only the
    // -DMK_FUSE_OPROJ=1 build has it: Runtime refuses a fuse_oproj Program without it),
    // OPROJ's the value the K-sliced DOWNs add to (isa.py).
    const bool copy = down ? kFuseOproj && ins[W_DOWN_COPY] != 0 : ins[W_OPROJ_COPY] != 0;
    // x_ll[l] has resid[2l+2]'s [B, d] layout, two words an element.
    const float* const level = a.resid + src * Bd;
    int32_t* const ll = kLlX && down ? x_ll_row(a, l, 0) : nullptr;
    for (int i = threadIdx.x; i < n * a.B; i += kConsumerThreads) {
      float* in = residual_in(a, ins, i);
      const float x = (i == threadIdx.x ? pre : ldcg(in)) + acc[i];
      in[Bd] = x;  // resid[src + 1], same entry
      if (copy) in[2 * Bd] = x;
      if (kLlX && down) st_ll1(ll + 2 * (in - level), x, epoch + 1);
    }
    return ERR_NONE;
  }
};

// RESID_SUM (tp > 1): resid[level+1][:, r0:r0+n] = resid[level][...] + part[level][0][...]
// + ... + part[level][tp-1][...], level = 2l + after_mlp, summed in rank order so every rank
// computes the same bits.
struct ResidSumOp {
  __device__ static int run(const KernelArgs& a, const int32_t* ins) {
    const int l = ins[W_LAYER], row0 = ins[W_RESID_SUM_ROW0], n = ins[W_RESID_SUM_NROWS];
    const int level = 2 * l + ins[W_RESID_SUM_AFTER_MLP];
    if (a.tp < 2 || a.part == nullptr || row0 < 0 || row0 + n > a.d) return ERR_BAD_INSTRUCTION;
    const size_t Bd = static_cast<size_t>(a.B) * a.d;
    const float* in = a.resid + level * Bd;
    const float* part = a.part + static_cast<size_t>(level) * a.tp * Bd;
    float* out = a.resid + (level + 1) * Bd;
    for (int i = threadIdx.x; i < n * a.B; i += kConsumerThreads) {
      const int b = i / n, j = i - b * n;
      const size_t o = static_cast<size_t>(b) * a.d + row0 + j;
      float s = ldcg(in + o);
      for (int r = 0; r < a.tp; ++r) s += ldcg(part + r * Bd + o);
      out[o] = s;
    }
    return ERR_NONE;
  }
};
}  // namespace mk
