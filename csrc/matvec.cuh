// The matvec core shared by QKV, OPROJ, GATEUP, DOWN and LMHEAD.
//
// An instruction multiplies rows [row0, row0+n) of one bf16 weight matrix [N, K] by a
// [B, K] fp32 activation. Its weights are cut into pages of at most kPageBytes:
// columns in chunks of kc (sized so a [B, kc] activation chunk fits kActFloats), rows in
// groups of rpp, pages ordered chunk-major. The LOADER warp streams pages into a ring of
// kNumPages shared-memory slots with bulk copies, running ahead across instruction
// boundaries without looking at counters (weights never depend on activations). The
// CONSUMER warps wait on counters, stage each activation chunk in shared memory (RMSNorm
// applied on the fly), accumulate [n, B] fp32 partial sums, then run the op's epilogue.
// Both sides walk the same page sequence, derived from `matvec_geometry` alone.
#pragma once
#include "common.cuh"

namespace mk {

struct MatvecGeometry {
  const __nv_bfloat16* w;  // row row0 of the matrix
  int K, n;                // in features; rows of this instruction
  int kc, rpp;             // columns per chunk; rows per page
  int nchunks, ngroups;
  __device__ int pages() const { return nchunks * ngroups; }
  __device__ int chunk_cols(int c) const { return min(kc, K - c * kc); }
  __device__ int group_rows(int g) const { return min(rpp, n - g * rpp); }
};

// Input of a matvec op: activation rows `x` (stride `ld`), optional RMSNorm weight.
struct MatvecInput {
  const float* x;
  int ld;
  const __nv_bfloat16* norm;  // null: no RMSNorm
};

__device__ __forceinline__ MatvecGeometry make_geometry(const __nv_bfloat16* matrix, int K,
                                                       int row0, int n, int B) {
  MatvecGeometry g;
  g.w = matrix + static_cast<size_t>(row0) * K;
  g.K = K;
  g.n = n;
  int kc = min(K, min(kPageElems, (kActFloats / B) & ~7));
  g.kc = kc;
  g.rpp = max(1, kPageElems / kc);
  g.nchunks = (K + kc - 1) / kc;
  g.ngroups = (n + g.rpp - 1) / g.rpp;
  return g;
}

__device__ __forceinline__ bool is_matvec(int op) {
  return op == OP_QKV || op == OP_OPROJ || op == OP_GATEUP || op == OP_DOWN || op == OP_LMHEAD;
}

// Geometry of any matvec instruction (the loader and the consumers both call this).
__device__ __forceinline__ MatvecGeometry matvec_geometry(const KernelArgs& a,
                                                          const int32_t* ins) {
  const int op = ins[W_OPCODE], l = ins[W_LAYER];
  const int row0 = ins[W_QKV_ROW0], n = ins[W_QKV_NROWS];  // same words for every matvec op
  const size_t d = a.d, I = a.I, HD = static_cast<size_t>(a.H) * a.D;
  const size_t nqkv = static_cast<size_t>(a.Hkv) * (a.H / a.Hkv + 2) * a.D;
  switch (op) {
    case OP_QKV: return make_geometry(a.wqkv + l * nqkv * d, a.d, row0, n, a.B);
    case OP_OPROJ: return make_geometry(a.wo + l * d * HD, static_cast<int>(HD), row0, n, a.B);
    case OP_GATEUP: return make_geometry(a.wgu + l * 2 * I * d, a.d, row0, n, a.B);
    case OP_DOWN: return make_geometry(a.wdown + l * d * I, a.I, row0, n, a.B);
    default: return make_geometry(a.lm_head, a.d, row0, n, a.B);  // OP_LMHEAD
  }
}

// Fields the consumers check before touching shared memory (the loader streams nothing more
// than the geometry says, so a rejected instruction only stops the block).
__device__ __forceinline__ bool matvec_valid(const KernelArgs& a, const int32_t* ins) {
  const int op = ins[W_OPCODE], row0 = ins[W_QKV_ROW0], n = ins[W_QKV_NROWS];
  const bool paired = op == OP_QKV || op == OP_GATEUP;
  return n > 0 && row0 >= 0 && n * a.B <= kAccFloats && (!paired || (row0 % 2 == 0 && n % 2 == 0));
}

__device__ __forceinline__ MatvecInput matvec_input(const KernelArgs& a, const int32_t* ins) {
  const int op = ins[W_OPCODE], l = ins[W_LAYER];
  const size_t Bd = static_cast<size_t>(a.B) * a.d;
  switch (op) {
    case OP_QKV: return {a.resid + 2 * l * Bd, a.d, a.attn_norm + static_cast<size_t>(l) * a.d};
    case OP_OPROJ: return {a.attn + static_cast<size_t>(l) * a.B * a.H * a.D, a.H * a.D, nullptr};
    case OP_GATEUP:
      return {a.resid + (2 * l + 1) * Bd, a.d, a.mlp_norm + static_cast<size_t>(l) * a.d};
    case OP_DOWN: return {a.act + static_cast<size_t>(l) * a.B * a.I, a.I, nullptr};
    default: return {a.resid + 2 * static_cast<size_t>(a.L) * Bd, a.d, a.final_norm};
  }
}

// ---- shared-memory ring ------------------------------------------------------------------
struct Ring {
  unsigned char* pages;    // kNumPages * kPageBytes
  uint64_t* full;          // [kNumPages] loader -> consumers (tx bytes)
  uint64_t* empty;         // [kNumPages] consumers -> loader (kConsumerWarps arrivals)
  volatile int* abort;     // set by consumers when the block stops early
};

// Loader warp: stream the pages of every matvec instruction of this SM's queue.
__device__ void loader_main(const KernelArgs& a, const Ring& ring, const int32_t* queue,
                            int qlen) {
  const int lane = threadIdx.x & 31;
  const uint64_t policy = evict_first_policy();
  uint32_t it = 0;
  bool stop = false;
  for (int i = 0; i < qlen && !stop; ++i) {
    const int32_t* ins = queue + static_cast<size_t>(i) * kWords;
    if (!is_matvec(__ldg(ins + W_OPCODE))) continue;
    const MatvecGeometry g = matvec_geometry(a, ins);
    for (int p = 0; p < g.pages(); ++p, ++it) {
      const int slot = it % kNumPages;
      const uint32_t round = it / kNumPages;
      while (!mbar_try_wait(&ring.empty[slot], (round & 1) ^ 1)) {
        if (*ring.abort) { stop = true; break; }
      }
      if (stop) break;
      const int c = p / g.ngroups, grp = p % g.ngroups;
      const int cols = g.chunk_cols(c), rows = g.group_rows(grp);
      const uint32_t row_bytes = cols * 2;
      if (lane == 0) mbar_arrive_expect_tx(&ring.full[slot], row_bytes * rows);
      __syncwarp();
      unsigned char* dst = ring.pages + static_cast<size_t>(slot) * kPageBytes;
      for (int r = lane; r < rows; r += 32) {
        const __nv_bfloat16* src =
            g.w + static_cast<size_t>(grp * g.rpp + r) * g.K + static_cast<size_t>(c) * g.kc;
        bulk_load(dst + r * row_bytes, src, row_bytes, &ring.full[slot], policy);
      }
    }
  }
  // Never leave the block with copies in flight: wait for the last fill of every slot.
  for (int s = 0; s < kNumPages && s < static_cast<int>(it); ++s) {
    const uint32_t last = it - 1 - ((it - 1 - s) % kNumPages);
    while (!mbar_try_wait(&ring.full[s], (last / kNumPages) & 1)) {}
  }
}

// Consumers: per-batch-row 1/rms of x over K, into rstd[B]. red: [kConsumerWarps * kMaxBatch].
__device__ void rms_scale(const KernelArgs& a, const MatvecInput& in, int K, float* red,
                          float* rstd) {
  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
  float part[kMaxBatch];
#pragma unroll
  for (int b = 0; b < kMaxBatch; ++b) part[b] = 0.f;
  for (int k = tid; k < K; k += kConsumerThreads) {
#pragma unroll
    for (int b = 0; b < kMaxBatch; ++b)
      if (b < a.B) { float v = ldcg(in.x + static_cast<size_t>(b) * in.ld + k); part[b] += v * v; }
  }
#pragma unroll
  for (int b = 0; b < kMaxBatch; ++b)
    if (b < a.B) { float s = warp_sum(part[b]); if (lane == 0) red[warp * kMaxBatch + b] = s; }
  consumer_sync();
  if (tid < a.B) {
    float s = 0.f;
    for (int w = 0; w < kConsumerWarps; ++w) s += red[w * kMaxBatch + tid];
    rstd[tid] = rsqrtf(s / K + a.eps);
  }
  consumer_sync();
}

// One page: rows x cols bf16 (row-major, stride cols) times act [B, cols] -> acc[row, b].
__device__ __forceinline__ void page_matvec(const unsigned char* page, int rows, int cols,
                                            int row_base, const float* act, float* acc, int B) {
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const uint4* wv = reinterpret_cast<const uint4*>(page);
  const int vecs = cols / 8;
  for (int r = warp; r < rows; r += kConsumerWarps) {
    float s[kMaxBatch];
#pragma unroll
    for (int b = 0; b < kMaxBatch; ++b) s[b] = 0.f;
    for (int v = lane; v < vecs; v += 32) {
      float w[8];
      bf16x8_to_float(wv[r * vecs + v], w);
#pragma unroll
      for (int b = 0; b < kMaxBatch; ++b) {
        if (b < B) {
          const float4* x = reinterpret_cast<const float4*>(act + b * cols + v * 8);
          const float4 x0 = x[0], x1 = x[1];
          s[b] += w[0] * x0.x + w[1] * x0.y + w[2] * x0.z + w[3] * x0.w +
                  w[4] * x1.x + w[5] * x1.y + w[6] * x1.z + w[7] * x1.w;
        }
      }
    }
#pragma unroll
    for (int b = 0; b < kMaxBatch; ++b) {
      if (b < B) {
        const float t = warp_sum(s[b]);
        if (lane == 0) acc[(row_base + r) * B + b] += t;
      }
    }
  }
}

// Consumers: the whole matvec of one instruction into acc[n, B]. `it` is the ring position
// shared with the loader's walk.
__device__ void consumer_matvec(const KernelArgs& a, const Ring& ring, const int32_t* ins,
                                uint32_t& it, float* act, float* acc, float* red, float* rstd) {
  const int tid = threadIdx.x, B = a.B;
  const MatvecGeometry g = matvec_geometry(a, ins);
  const MatvecInput in = matvec_input(a, ins);
  for (int i = tid; i < g.n * B; i += kConsumerThreads) acc[i] = 0.f;
  if (in.norm) rms_scale(a, in, g.K, red, rstd);
  for (int c = 0; c < g.nchunks; ++c) {
    const int cols = g.chunk_cols(c), col0 = c * g.kc;
    consumer_sync();  // every warp is done with the previous chunk
    for (int i = tid; i < B * cols; i += kConsumerThreads) {
      const int b = i / cols, k = i - b * cols;
      float x = ldcg(in.x + static_cast<size_t>(b) * in.ld + col0 + k);
      if (in.norm) x *= rstd[b] * __bfloat162float(in.norm[col0 + k]);
      act[b * cols + k] = x;
    }
    consumer_sync();
    for (int grp = 0; grp < g.ngroups; ++grp, ++it) {
      const int slot = it % kNumPages;
      while (!mbar_try_wait(&ring.full[slot], (it / kNumPages) & 1)) {}
      page_matvec(ring.pages + static_cast<size_t>(slot) * kPageBytes, g.group_rows(grp), cols,
                  grp * g.rpp, act, acc, B);
      __syncwarp();
      if ((tid & 31) == 0) mbar_arrive(&ring.empty[slot]);
    }
  }
  consumer_sync();  // acc complete
}

}  // namespace mk
