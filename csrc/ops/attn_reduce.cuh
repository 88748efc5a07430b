// ATTN_REDUCE: merge the NS flash-decoding partials of q heads h0 .. h0+nh-1 of kv group g
// (h0 = g*G + head0), batch row b: attn[l, b, h*D + i] = sum_s exp(lse_s - LSE) o_s[i],
// LSE = logsumexp_s lse_s.
// Each output vector of 4 dims gets P threads (P a power of 2, at most 32: adjacent lanes),
// thread p taking splits p, p+P, ...; a thread's loads of up to kGroup splits are issued
// before any is used, and the P running (max, weight sum, weighted o) triples merge by
// shuffles. A reduce of 128 dims x 32 splits is one L2 round trip per thread, where a
// thread per element walking the splits in order took NS / 8 of them per element.
#pragma once
#include "../common.cuh"

namespace mk {
struct AttnReduceOp {
  static constexpr int kGroup = 8;

  // Two running softmax states merged: (m, w, o) += (m2, w2, o2), m the largest lse seen.
  __device__ static void merge(float& m, float& w, float4& o, float m2, float w2, float4 o2) {
    const float mn = fmaxf(m, m2);
    if (mn == -INFINITY) return;  // both empty
    const float c = expf(m - mn), c2 = expf(m2 - mn);  // -inf - mn: weight 0
    w = w * c + w2 * c2;
    o = make_float4(o.x * c + o2.x * c2, o.y * c + o2.y * c2, o.z * c + o2.z * c2,
                    o.w * c + o2.w * c2);
    m = mn;
  }

  __device__ static int run(const KernelArgs& a, const int32_t* ins) {
    const int l = ins[W_LAYER], b = ins[W_ATTN_REDUCE_B], g = ins[W_ATTN_REDUCE_KV_HEAD];
    const int head0 = ins[W_ATTN_REDUCE_HEAD0], nh = ins[W_ATTN_REDUCE_NHEADS];
    if (b < 0 || b >= a.B || g < 0 || g >= a.Hkv || head0 < 0 || nh < 1 ||
        head0 + nh > a.H / a.Hkv)
      return ERR_BAD_INSTRUCTION;
    merge_heads(a, l, b, g, head0, nh);
    return ERR_NONE;
  }

  // attn[l, b] of q heads head0 .. head0+nh-1 of kv group g from their NS partials (also
  // the merge of a merging ATTN's last split, attn.cuh, which passes stamp = false so its
  // own phase stamps stand). Fields checked by the caller.
  __device__ static void merge_heads(const KernelArgs& a, int l, int b, int g, int head0,
                                     int nh, bool stamp = true) {
    const int G = a.H / a.Hkv, D = a.D;
    const size_t head = (static_cast<size_t>(l) * a.B + b) * a.H + g * G + head0;  // first
    float* out = a.attn + (static_cast<size_t>(l) * a.B + b) * a.H * D +
                 static_cast<size_t>(g * G + head0) * D;
    merge_vectors(a, nh * D / 4, [&](int v) {  // D is a multiple of 4
      return MergeSource{head + v * 4 / D, v * 4 % D};
    }, [&](int v, float4 o) { *reinterpret_cast<float4*>(out + v * 4) = o; }, stamp);
  }

  // Vector v (4 dims) of a merge: partials of flat head `head` ((l * B + b) * H + h), dims
  // dim .. dim+3.
  struct MergeSource {
    size_t head;
    int dim;
  };

  // Every consumer thread: the merges of nvec 4-dim vectors, src(v) -> MergeSource, each
  // merged vector handed to out(v, float4) by one thread.
  template <typename Src, typename Out>
  __device__ static void merge_vectors(const KernelArgs& a, int nvec, Src&& src, Out&& out,
                                       bool stamp) {
    const int D = a.D, NS = a.NS;
    int P = 1;
    while (P < 32 && P < NS && 2 * P * nvec <= kConsumerThreads) P *= 2;
    const int tid = threadIdx.x, p = tid % P;
    // Every thread runs every pass (the shuffles need whole warps); v >= nvec idles.
    for (int v0 = 0; v0 < nvec; v0 += kConsumerThreads / P) {
      const int v = v0 + tid / P;
      const bool valid = v < nvec;
      const MergeSource at = valid ? src(v) : MergeSource{0, 0};
      const float* lse = a.lse + at.head * NS;
      const float* op = a.o_part + at.head * NS * D + at.dim;
      float m = -INFINITY, w = 0.f;
      float4 o = make_float4(0.f, 0.f, 0.f, 0.f);
      for (int s0 = p; valid && s0 < NS; s0 += kGroup * P) {
        float ls[kGroup];
        float4 os[kGroup];
#pragma unroll
        for (int j = 0; j < kGroup; ++j) {
          const int s = s0 + j * P;
          ls[j] = s < NS ? ldcg(lse + s) : -INFINITY;
          os[j] = s < NS ? __ldcg(reinterpret_cast<const float4*>(op + static_cast<size_t>(s) * D))
                         : make_float4(0.f, 0.f, 0.f, 0.f);
        }
        float mg = m;
#pragma unroll
        for (int j = 0; j < kGroup; ++j) mg = fmaxf(mg, ls[j]);
        if (mg == -INFINITY) continue;  // every split so far empty
        const float c = expf(m - mg);   // m == -inf: 0, and w, o are 0
        w *= c;
        o = make_float4(o.x * c, o.y * c, o.z * c, o.w * c);
#pragma unroll
        for (int j = 0; j < kGroup; ++j) {
          const float e = expf(ls[j] - mg);  // empty split: lse -inf, weight 0
          w += e;
          o = make_float4(o.x + e * os[j].x, o.y + e * os[j].y, o.z + e * os[j].z,
                          o.w + e * os[j].w);
        }
        m = mg;
      }
      if (stamp && v0 == 0) phase_stamp(0);  // thread 0's partials loaded, weighed (1st pass)
      for (int off = 1; off < P; off <<= 1) {
        const float m2 = __shfl_xor_sync(0xffffffffu, m, off);
        const float w2 = __shfl_xor_sync(0xffffffffu, w, off);
        float4 o2;
        o2.x = __shfl_xor_sync(0xffffffffu, o.x, off);
        o2.y = __shfl_xor_sync(0xffffffffu, o.y, off);
        o2.z = __shfl_xor_sync(0xffffffffu, o.z, off);
        o2.w = __shfl_xor_sync(0xffffffffu, o.w, off);
        merge(m, w, o, m2, w2, o2);
      }
      if (valid && p == 0) {
        const float r = m == -INFINITY ? 0.f : 1.f / w;
        out(v, make_float4(o.x * r, o.y * r, o.z * r, o.w * r));
      }
      if (stamp && v0 == 0) phase_stamp(1);  // thread 0's first pass merged and stored
    }
  }
};
}  // namespace mk
