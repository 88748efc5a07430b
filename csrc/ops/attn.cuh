// ATTN: flash-decoding partial of kv head g, batch row b, split s of NS over cache
// positions [0, pos[b]] (attn_range: the split's positions). Writes, for the G q heads of
// the group, o_part (normalised by the split's softmax sum) and lse (log of that sum of exp(scaled scores)); an empty split
// writes o = 0, lse = -inf.
//
// Work split: LP = D/8 lanes hold one position (8 dims each, 16-byte loads), a warp holds
// 32/LP positions at a time; each lane keeps an online-softmax state for every q head of the
// group. States merge across the lanes of a warp by shuffles, then across warps in smem.
#pragma once
#include "../common.cuh"
#include "../inputs.cuh"
#include "attn_reduce.cuh"

namespace mk {

struct SoftmaxState {
  float m, l;  // running max (of scaled scores) and sum of exp(score - m)
};

// Merge (m2, l2, o2) into (m, l, o); -inf maxima mean "empty".
__device__ __forceinline__ void merge_state(float& m, float& l, float* o, float m2, float l2,
                                            const float* o2) {
  const float mn = fmaxf(m, m2);
  if (mn == -INFINITY) return;
  const float c1 = expf(m - mn), c2 = expf(m2 - mn);
  l = l * c1 + l2 * c2;
#pragma unroll
  for (int k = 0; k < 8; ++k) o[k] = o[k] * c1 + o2[k] * c2;
  m = mn;
}

// NG: the q heads of a group the per-lane state is unrolled for (G <= NG). kExact: G == NG,
// so the head loops have no exits and the compiler interleaves the heads' dependent chains
// (dot product, shuffles, exponentials); with exits each head ran after the other (the s10
// ncu profile: the step's samples short-scoreboard and fixed-latency waits, none on loads).
// Returns ERR_WATCHDOG where kLlQ's inputs did not come (the outputs are then garbage).
template <int LP, int NG, bool kExact>
__device__ int attn_split(const KernelArgs& a, const int32_t* ins, float* smem, int p,
                          int epoch) {
  constexpr int PW = 32 / LP;                       // positions per warp step
  constexpr int kStep = kConsumerWarps * PW;        // positions per block step
  const int l = ins[W_LAYER], b = ins[W_ATTN_B], g = ins[W_ATTN_KV_HEAD], s = ins[W_ATTN_SPLIT];
  const int G = a.H / a.Hkv, D = LP * 8;
  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
  const int sub = lane / LP, part = lane % LP;
  const AttnRange range = attn_range(a, p, s);
  const int s0 = range.s0, s1 = range.s1;
  const float scale = rsqrtf(static_cast<float>(D));
  const __nv_bfloat16* kcache = a.k_cache + kv_offset(a, l, b, g) + part * 8;
  const __nv_bfloat16* vcache = a.v_cache + kv_offset(a, l, b, g) + part * 8;

  // K/V of this lane's first position load while the queries are staged (they do not depend
  // on each other), and every step loads the next step's: one L2/HBM round trip in flight
  // ahead of the math instead of one per step.
  uint4 kn = make_uint4(0, 0, 0, 0), vn = kn;
  if (s0 + warp * PW + sub < s1) {
    kn = ldcg16(kcache + static_cast<size_t>(s0 + warp * PW + sub) * D);
    vn = ldcg16(vcache + static_cast<size_t>(s0 + warp * PW + sub) * D);
  }

  // smem: ms [warps][G], ls [warps][G], os [warps][G][D], the scaled queries qs [G][D], then
  // (kLlQ) position p's K and V rows, bf16 [2][kMaxD].
  float* ms = smem;
  float* ls = ms + kConsumerWarps * kMaxG;
  float* os = ls + kConsumerWarps * kMaxG;
  float* qs = os + kConsumerWarps * kMaxG * kMaxD;
  __nv_bfloat16* kvp = reinterpret_cast<__nv_bfloat16*>(qs + kMaxG * kMaxD);
  int err = ERR_NONE;
  if constexpr (kLlQ) {
    // q_ll units of the group's heads, then (the split holding p) kv_ll's K and V units.
    const int half = D / 2, nq = G * half;
    const int n = nq + (s0 <= p && p < s1 ? 2 * half : 0);
    const int32_t* qll = q_ll_units(a, l, b, g * G);  // the group's heads, one after the other
    const int32_t* kvll = kv_ll_units(a, l, b, g);
    constexpr int kPer = (NG * LP * 4 + LP * 8 + kConsumerThreads - 1) / kConsumerThreads;
    const bool ok = poll_ll<kPer>(a, n, epoch + 1, [&](int i) {
      return i < nq ? qll + i * 4 : kvll + (i - nq) * 4;
    }, [&](int i, float x0, float x1) {
      if (i < nq) {
        const int h = i / half, d0 = i - h * half;
        qs[h * D + d0] = scale * x0;
        qs[h * D + d0 + half] = scale * x1;
      } else if (i < nq + half) {  // K: dims (u, u + D/2)
        kvp[i - nq] = __float2bfloat16(x0);
        kvp[i - nq + half] = __float2bfloat16(x1);
      } else {                     // V: dims (2u, 2u + 1)
        kvp[kMaxD + 2 * (i - nq - half)] = __float2bfloat16(x0);
        kvp[kMaxD + 2 * (i - nq - half) + 1] = __float2bfloat16(x1);
      }
    });
    if (!ok) err = ERR_WATCHDOG;
  } else {
    const float* qsrc = a.q + ((static_cast<size_t>(l) * a.B + b) * a.H + g * G) * D;
    for (int i = tid; i < G * D; i += kConsumerThreads) qs[i] = scale * ldcg(qsrc + i);
  }
  consumer_sync();
  phase_stamp(0);  // queries staged

  float o[NG][8], m[NG], lsum[NG];
#pragma unroll
  for (int h = 0; h < NG; ++h) {
    m[h] = -INFINITY;
    lsum[h] = 0.f;
#pragma unroll
    for (int k = 0; k < 8; ++k) o[h][k] = 0.f;
  }
  for (int t0 = s0 + warp * PW; t0 < s1; t0 += kStep) {
    const int t = t0 + sub;
    const bool valid = t < s1;
    float kf[8], vf[8];
    if constexpr (kLlQ) {  // position p: this step's K/V, from kv_ll (the cache row races)
      if (t == p) {
        kn = *reinterpret_cast<const uint4*>(kvp + part * 8);
        vn = *reinterpret_cast<const uint4*>(kvp + kMaxD + part * 8);
      }
    }
    bf16x8_to_float(kn, kf);
    bf16x8_to_float(vn, vf);
    if (t + kStep < s1) {
      kn = ldcg16(kcache + static_cast<size_t>(t + kStep) * D);
      vn = ldcg16(vcache + static_cast<size_t>(t + kStep) * D);
    }
    float scs[NG];  // kExact: every head's score first, their shuffles interleaved
    if constexpr (kExact) {
#pragma unroll
      for (int h = 0; h < NG; ++h) {
        const float4* qv = reinterpret_cast<const float4*>(qs + h * D + part * 8);
        const float4 q0 = qv[0], q1 = qv[1];
        scs[h] = (fmaf(q0.y, kf[1], q0.x * kf[0]) + fmaf(q0.w, kf[3], q0.z * kf[2])) +
                 (fmaf(q1.y, kf[5], q1.x * kf[4]) + fmaf(q1.w, kf[7], q1.z * kf[6]));
      }
#pragma unroll
      for (int off = LP / 2; off > 0; off >>= 1) {
#pragma unroll
        for (int h = 0; h < NG; ++h) scs[h] += __shfl_xor_sync(0xffffffffu, scs[h], off);
      }
    }
#pragma unroll
    for (int h = 0; h < NG; ++h) {
      if (!kExact && h >= G) break;
      float sc;
      if constexpr (kExact) {
        sc = scs[h];
      } else {
        const float4* qv = reinterpret_cast<const float4*>(qs + h * D + part * 8);
        const float4 q0 = qv[0], q1 = qv[1];
        sc = q0.x * kf[0] + q0.y * kf[1] + q0.z * kf[2] + q0.w * kf[3] +
             q1.x * kf[4] + q1.y * kf[5] + q1.z * kf[6] + q1.w * kf[7];
#pragma unroll
        for (int off = LP / 2; off > 0; off >>= 1) sc += __shfl_xor_sync(0xffffffffu, sc, off);
      }
      if (valid) {
        const float mn = fmaxf(m[h], sc), c = expf(m[h] - mn), p = expf(sc - mn);
        lsum[h] = lsum[h] * c + p;
#pragma unroll
        for (int k = 0; k < 8; ++k) o[h][k] = o[h][k] * c + p * vf[k];
        m[h] = mn;
      }
    }
  }
  phase_stamp(1);  // warp 0's positions done (its K/V landed)
  // Merge the PW position groups of the warp (lanes part, part+LP, ...).
#pragma unroll 1
  for (int off = LP; off < 32; off <<= 1) {
#pragma unroll
    for (int h = 0; h < NG; ++h) {
      if (!kExact && h >= G) break;
      float o2[8];
#pragma unroll
      for (int k = 0; k < 8; ++k) o2[k] = __shfl_xor_sync(0xffffffffu, o[h][k], off);
      const float m2 = __shfl_xor_sync(0xffffffffu, m[h], off);
      const float l2 = __shfl_xor_sync(0xffffffffu, lsum[h], off);
      merge_state(m[h], lsum[h], o[h], m2, l2, o2);
    }
  }
  if (sub == 0) {
#pragma unroll
    for (int h = 0; h < NG; ++h) {
      if (!kExact && h >= G) break;
      if (part == 0) { ms[warp * kMaxG + h] = m[h]; ls[warp * kMaxG + h] = lsum[h]; }
#pragma unroll
      for (int k = 0; k < 8; ++k) os[(warp * kMaxG + h) * D + part * 8 + k] = o[h][k];
    }
  }
  consumer_sync();
  phase_stamp(2);  // every warp's states in shared memory
  if constexpr (kLlPartials) {
    // A thread per pair of dims (one flagged unit of part_ll) or per head's lse (unit D/2,
    // the value twice); o_part and lse get the same values (the tests read them).
    const int half = D / 2, tag = epoch + 1;
    for (int i = tid; i < G * (half + 1); i += kConsumerThreads) {
      const int h = i / (half + 1), u = i - h * (half + 1);
      float M = -INFINITY;
      for (int w = 0; w < kConsumerWarps; ++w) M = fmaxf(M, ms[w * kMaxG + h]);
      float L = 0.f, O0 = 0.f, O1 = 0.f;
      if (M != -INFINITY) {
        for (int w = 0; w < kConsumerWarps; ++w) {
          const float c = expf(ms[w * kMaxG + h] - M);
          L += ls[w * kMaxG + h] * c;
          if (u < half) {
            O0 += os[(w * kMaxG + h) * D + 2 * u] * c;
            O1 += os[(w * kMaxG + h) * D + 2 * u + 1] * c;
          }
        }
      }
      const size_t head = (static_cast<size_t>(l) * a.B + b) * a.H + g * G + h;
      int32_t* unit = a.part_ll + ((head * a.NS + s) * (half + 1) + u) * 4;
      if (u < half) {
        const float o0 = M == -INFINITY ? 0.f : O0 / L, o1 = M == -INFINITY ? 0.f : O1 / L;
        a.o_part[(head * a.NS + s) * D + 2 * u] = o0;
        a.o_part[(head * a.NS + s) * D + 2 * u + 1] = o1;
        st_ll(unit, o0, o1, tag);
      } else {
        const float lse = M == -INFINITY ? -INFINITY : M + logf(L);
        a.lse[head * a.NS + s] = lse;
        st_ll(unit, lse, lse, tag);
      }
    }
  } else {
    for (int i = tid; i < G * D; i += kConsumerThreads) {
      const int h = i / D, dim = i % D;
      float M = -INFINITY;
      for (int w = 0; w < kConsumerWarps; ++w) M = fmaxf(M, ms[w * kMaxG + h]);
      float L = 0.f, O = 0.f;
      if (M != -INFINITY) {
        for (int w = 0; w < kConsumerWarps; ++w) {
          const float c = expf(ms[w * kMaxG + h] - M);
          L += ls[w * kMaxG + h] * c;
          O += os[(w * kMaxG + h) * D + dim] * c;
        }
      }
      const size_t head = (static_cast<size_t>(l) * a.B + b) * a.H + g * G + h;
      a.o_part[(head * a.NS + s) * D + dim] = M == -INFINITY ? 0.f : O / L;
      if (dim == 0) a.lse[head * a.NS + s] = M == -INFINITY ? -INFINITY : M + logf(L);
    }
  }
  phase_stamp(3);  // thread 0's outputs stored
  return err;
}

struct AttnOp {
  // smem: >= kConsumerWarps * kMaxG * (2 + kMaxD) + kMaxG * kMaxD floats; pos: the launch's
  // positions (shared memory).
  __device__ static int run(const KernelArgs& a, const int32_t* ins, float* smem,
                            const int* pos, int epoch) {
    const int p = pos[ins[W_ATTN_B]];
    if (p < 0 || p >= a.S) return ERR_BAD_POSITION;
    if (a.H > kMaxG * a.Hkv) return ERR_BAD_INSTRUCTION;  // a -DMK_MAX_G build's limit
    const bool g4 = kAttnExactG && a.H == 4 * a.Hkv;  // Llama 3.2-1B, 3.1-8B
    switch (a.D) {
      case 32: return attn_split<4, kMaxG, false>(a, ins, smem, p, epoch);
      case 64:
        return g4 ? attn_split<8, 4, true>(a, ins, smem, p, epoch)
                  : attn_split<8, kMaxG, false>(a, ins, smem, p, epoch);
      default:  // 128; the runtime rejects other D
        return g4 ? attn_split<16, 4, true>(a, ins, smem, p, epoch)
                  : attn_split<16, kMaxG, false>(a, ins, smem, p, epoch);
    }
  }

  // isa.py ATTN merge (the -DMK_FUSE_REDUCE=1 build; the interpreter calls it after run):
  // after the bar.sync every partial of this split is written; thread 0's acq_rel ticket
  // add releases them and acquires the earlier splits'; the split that brings the ticket to
  // its target merges the group, the other threads ordered after that acquire by the
  // second bar.sync (as after a counter wait).
  __device__ static void merge_if_last(const KernelArgs& a, const int32_t* ins,
                                       volatile int* last, int epoch) {
    consumer_sync();  // partials written, the attention scratch (smem) free
    if (threadIdx.x == 0) {
      const int t = ins[W_ATTN_TICKET];
      const uint32_t need = static_cast<uint32_t>(__ldg(a.counter_targets + t)) * (epoch + 1);
      *last = static_cast<uint32_t>(atom_add_acq_rel(a.counters + t, 1)) + 1u == need;
    }
    consumer_sync();
    if (*last) {
      AttnReduceOp::merge_heads(a, ins[W_LAYER], ins[W_ATTN_B], ins[W_ATTN_KV_HEAD], 0,
                                a.H / a.Hkv, false);
    }
  }
};
}  // namespace mk
