// QKV epilogue: RoPE on pair-interleaved q/k rows at pos[b] (pos: the launch's positions,
// staged in shared memory), q -> q[l] (fp32),
// k/v -> the caches at pos[b] (bf16). The matvec (with RMSNorm) ran before.
// acc: [n, B] fp32 for packed rows row0 .. row0+n-1 (row0 and n even).
#pragma once
#include "../common.cuh"

namespace mk {
struct QkvOp {
  // RoPE cos and sin of this thread's first row pair (epilogue i = threadIdx.x), loaded
  // before the matvec (PreLoad); none for a v pair or a position the epilogue rejects.
  __device__ static PreLoad rope_src(const KernelArgs& a, const int32_t* ins, const int* pos) {
    const int i = threadIdx.x, row0 = ins[W_QKV_ROW0], n = ins[W_QKV_NROWS], B = a.B;
    const int D = a.D, G = a.H / a.Hkv, half = D / 2, group_rows = (G + 2) * D;
    PreLoad r;
    if (i >= (n / 2) * B) return r;
    const int pr = i / B, b = i - pr * B, packed = row0 + 2 * pr;
    const int j = packed % group_rows, p = pos[b];
    if (j >= (G + 1) * D || p < 0 || p >= a.S) return r;
    const size_t at = static_cast<size_t>(p) * half + (j % D) / 2;
    r.x = a.rope_cos + at;
    r.y = a.rope_sin + at;
    return r;
  }

  // rope: rope_src's values, loaded (thread i's first pair, when it had them). kLlQ: q and
  // the position's k / v also go to q_ll / kv_ll, tagged epoch + 1.
  __device__ static int epilogue(const KernelArgs& a, const int32_t* ins, const float* acc,
                                 const int* pos, float2 rope, int epoch) {
    const int l = ins[W_LAYER], row0 = ins[W_QKV_ROW0], n = ins[W_QKV_NROWS];
    const int B = a.B, D = a.D, G = a.H / a.Hkv, half = D / 2, group_rows = (G + 2) * D;
    int err = ERR_NONE;
    for (int i = threadIdx.x; i < (n / 2) * B; i += kConsumerThreads) {
      const int pr = i / B, b = i - pr * B, r = 2 * pr;   // local row pair (r, r + 1)
      const int packed = row0 + r, g = packed / group_rows, j = packed - g * group_rows;
      const float x0 = acc[r * B + b], x1 = acc[(r + 1) * B + b];
      const int p = pos[b];
      if (p < 0 || p >= a.S) { err = ERR_BAD_POSITION; continue; }
      const size_t kv = ((static_cast<size_t>(l) * B + b) * a.Hkv + g) * a.S + p;
      if (j < (G + 1) * D) {  // q or k head: (x0, x1) = dims (jj/2, jj/2 + D/2)
        const int jj = j % D, d0 = jj / 2;
        const bool first = i == static_cast<int>(threadIdx.x);  // rope_src loaded these
        const float c = first ? rope.x : a.rope_cos[static_cast<size_t>(p) * half + d0];
        const float s = first ? rope.y : a.rope_sin[static_cast<size_t>(p) * half + d0];
        const float y0 = x0 * c - x1 * s, y1 = x1 * c + x0 * s;
        if (j < G * D) {
          const int h = g * G + j / D;
          float* q = a.q + ((static_cast<size_t>(l) * B + b) * a.H + h) * D;
          q[d0] = y0;
          q[d0 + half] = y1;
          if constexpr (kLlQ)
            st_ll(q_ll_units(a, l, b, h) + d0 * 4, y0, y1, epoch + 1);
        } else {
          __nv_bfloat16* k = a.k_cache + kv * D;
          const __nv_bfloat16 k0 = __float2bfloat16(y0), k1 = __float2bfloat16(y1);
          k[d0] = k0;
          k[d0 + half] = k1;
          if constexpr (kLlQ)
            st_ll(kv_ll_units(a, l, b, g) + d0 * 4, __bfloat162float(k0), __bfloat162float(k1),
                  epoch + 1);
        }
      } else {                // v head: natural order
        const int jj = j - (G + 1) * D;
        __nv_bfloat16* v = a.v_cache + kv * D;
        const __nv_bfloat16 v0 = __float2bfloat16(x0), v1 = __float2bfloat16(x1);
        v[jj] = v0;
        v[jj + 1] = v1;
        if constexpr (kLlQ)
          st_ll(kv_ll_units(a, l, b, g) + (half + jj / 2) * 4, __bfloat162float(v0),
                __bfloat162float(v1), epoch + 1);
      }
    }
    return err;
  }
};
}  // namespace mk
