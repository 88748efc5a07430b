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

  // epoch: the launch's (kLlPartials: the partials' tags are epoch + 1; the interpreter
  // skips this instruction's counter wait and the merge polls the tags instead).
  __device__ static int run(const KernelArgs& a, const int32_t* ins, int epoch) {
    const int l = ins[W_LAYER], b = ins[W_ATTN_REDUCE_B], g = ins[W_ATTN_REDUCE_KV_HEAD];
    const int head0 = ins[W_ATTN_REDUCE_HEAD0], nh = ins[W_ATTN_REDUCE_NHEADS];
    if (b < 0 || b >= a.B || g < 0 || g >= a.Hkv || head0 < 0 || nh < 1 ||
        head0 + nh > a.H / a.Hkv)
      return ERR_BAD_INSTRUCTION;
    return merge_heads<kLlPartials>(a, l, b, g, head0, nh, true, epoch + 1);
  }

  // attn[l, b] of q heads head0 .. head0+nh-1 of kv group g from their NS partials (also
  // the merge of a merging ATTN's last split, attn.cuh, which passes stamp = false so its
  // own phase stamps stand). Fields checked by the caller. kLl: from part_ll, polling for
  // `tag` (ERR_WATCHDOG when it does not come); else from o_part / lse.
  template <bool kLl = false>
  __device__ static int merge_heads(const KernelArgs& a, int l, int b, int g, int head0,
                                    int nh, bool stamp = true, int tag = 0) {
    const int G = a.H / a.Hkv, D = a.D;
    const size_t head = (static_cast<size_t>(l) * a.B + b) * a.H + g * G + head0;  // first
    float* out = a.attn + (static_cast<size_t>(l) * a.B + b) * a.H * D +
                 static_cast<size_t>(g * G + head0) * D;
    return merge_vectors<kLl>(a, nh * D / 4, [&](int v) {  // D is a multiple of 4
      return MergeSource{head + v * 4 / D, v * 4 % D};
    }, [&](int v, float4 o) { *reinterpret_cast<float4*>(out + v * 4) = o; }, stamp, tag);
  }

  // Vector v (4 dims) of a merge: partials of flat head `head` ((l * B + b) * H + h), dims
  // dim .. dim+3.
  struct MergeSource {
    size_t head;
    int dim;
  };

  // Up to kG splits of one 4-dim vector from part_ll (dims at.dim .. +3 and the lse unit),
  // every pending split's loads in flight at once, reloaded until its tags read `tag`.
  // false: the wait ran past the watchdog or another SM reported an error.
  template <int kG>
  __device__ static bool load_ll(const KernelArgs& a, MergeSource at, int s0, int P, int tag,
                                 float* ls, float4* os) {
    const int NS = a.NS, units = a.D / 2 + 1;
    const int32_t* base = a.part_ll + at.head * NS * units * 4 + at.dim * 2;
    uint32_t pending = 0;
#pragma unroll
    for (int j = 0; j < kG; ++j) {
      const bool in = s0 + j * P < NS;
      pending |= in ? 1u << j : 0u;
      ls[j] = -INFINITY;
      os[j] = make_float4(0.f, 0.f, 0.f, 0.f);
    }
    uint64_t start = 0;
#pragma unroll 1
    for (uint32_t spins = 0; pending; ++spins) {
      uint4 u0[kG], u1[kG], ul[kG];  // loads first, no branch between them: one round trip
#pragma unroll
      for (int j = 0; j < kG; ++j) {
        const int32_t* r = base + static_cast<size_t>(s0 + j * P) * units * 4;
        if (pending >> j & 1) {
          u0[j] = ld_ll(r);
          u1[j] = ld_ll(r + 4);
          ul[j] = ld_ll(r - at.dim * 2 + (units - 1) * 4);
        }
      }
#pragma unroll
      for (int j = 0; j < kG; ++j) {
        if ((pending >> j & 1) && ll_ready(ul[j], tag) && ll_ready(u0[j], tag) &&
            ll_ready(u1[j], tag)) {
          pending &= ~(1u << j);
          ls[j] = __int_as_float(static_cast<int>(ul[j].x));
          os[j] = make_float4(__int_as_float(static_cast<int>(u0[j].x)),
                              __int_as_float(static_cast<int>(u0[j].z)),
                              __int_as_float(static_cast<int>(u1[j].x)),
                              __int_as_float(static_cast<int>(u1[j].z)));
        }
      }
      if (pending && ll_give_up(a, spins, start)) return false;
    }
    return true;
  }

  // Every consumer thread: the merges of nvec 4-dim vectors, src(v) -> MergeSource, each
  // merged vector handed to out(v, float4) by one thread. kLl: the partials from part_ll
  // (load_ll, polling for `tag`); returns ERR_WATCHDOG if they did not come.
  template <bool kLl = false, typename Src, typename Out>
  __device__ static int merge_vectors(const KernelArgs& a, int nvec, Src&& src, Out&& out,
                                      bool stamp, int tag = 0) {
    constexpr int kG = kLl ? 2 : kGroup;  // LL: 3 16-byte units a split; 3 or 4 spill in ATTN
    int err = ERR_NONE;
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
      for (int s0 = p; valid && s0 < NS; s0 += kG * P) {
        float ls[kG];
        float4 os[kG];
        if constexpr (kLl) {
          if (!load_ll<kG>(a, at, s0, P, tag, ls, os)) { err = ERR_WATCHDOG; break; }
        } else {
#pragma unroll
          for (int j = 0; j < kG; ++j) {
            const int s = s0 + j * P;
            ls[j] = s < NS ? ldcg(lse + s) : -INFINITY;
            os[j] = s < NS ? __ldcg(reinterpret_cast<const float4*>(op + static_cast<size_t>(s) * D))
                           : make_float4(0.f, 0.f, 0.f, 0.f);
          }
        }
        float mg = m;
#pragma unroll
        for (int j = 0; j < kG; ++j) mg = fmaxf(mg, ls[j]);
        if (mg == -INFINITY) continue;  // every split so far empty
        const float c = expf(m - mg);   // m == -inf: 0, and w, o are 0
        w *= c;
        o = make_float4(o.x * c, o.y * c, o.z * c, o.w * c);
#pragma unroll
        for (int j = 0; j < kG; ++j) {
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
    return err;
  }
};
}  // namespace mk
