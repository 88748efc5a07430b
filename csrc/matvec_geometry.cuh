// What a matvec instruction (QKV, OPROJ, GATEUP, DOWN, LMHEAD) reads, and how its weights
// are cut: the geometry both the loader and the consumers derive from the record, the
// activation input (resid levels, folded partials, flagged x_ll), the record's validity.
// The consumers' compute is matvec.cuh (CUDA cores) and matvec_tc.cuh (tensor cores).
// The page scheme both sides walk: matvec.cuh's header.
#pragma once
#include <type_traits>

#include "common.cuh"
#include "ring.cuh"

namespace mk {

// The compile-time batch a matvec runs at (B <= bucket).
__host__ __device__ constexpr int batch_bucket(int B) {
  return B <= 1 ? 1 : B <= 2 ? 2 : B <= 4 ? 4 : B <= 8 ? 8 : 16;
}
// Tensor-core n-tiles of 8 batch columns for batch B; 0: CUDA cores.
__host__ __device__ constexpr int tc_ntiles(int B) {
  return batch_bucket(B) >= kTcMinBucket ? (B + 7) / 8 : 0;
}

struct MatvecGeometry {
  const __nv_bfloat16* w;  // row row0 of the matrix
  int K, n;                // in features; rows of this instruction
  int ld;                  // elements from one row of the matrix to the next (K but in axpy)
  int kc, rpp;             // columns per chunk; rows per page
  int nchunks, ngroups;
  int nt;                  // tc_ntiles(B)
  __device__ int pages() const { return nchunks * ngroups; }
  __device__ int chunk_cols(int c) const { return min(kc, K - c * kc); }
  __device__ int group_rows(int g) const { return min(rpp, n - g * rpp); }
  // Bytes from one row of a page to the next in shared memory: tensor-core pages round
  // rows up to an odd number of 16-byte units, so the 8 rows of an ldmatrix 8x8 tile fall
  // in 8 different bank groups.
  __device__ int stride(int cols) const { return nt ? ((cols >> 3) | 1) << 4 : cols * 2; }
};

// Input of a matvec op: activation rows `x` (stride `ld`), optional RMSNorm weight. A
// folding reader (isa.py fold, tp > 1) adds the nparts partials at parts + r * ld * B to
// every element, in rank order, and stores the sums of columns [w0, w1) to `out`.
// Only the -DMK_FOLD=1 build has these (Runtime refuses a folding Program without it).
// Epilogue inputs of this thread that do not depend on the matvec, loaded with the first
// activation chunk so the epilogue spends no L2 round trip on them: OPROJ and DOWN's residual
// entry (x); QKV's RoPE cos (x) and sin (y) of its first row pair. Null: none.
struct PreLoad {
  const float* x = nullptr;
  const float* y = nullptr;
  __device__ float2 load() const { return make_float2(x ? ldcg(x) : 0.f, y ? ldcg(y) : 0.f); }
};

struct MatvecInput {
  const float* x;
  int ld;
  const __nv_bfloat16* norm;  // null: no RMSNorm
#if MK_LL_X
  const int32_t* ll = nullptr;  // x as flagged elements (x_ll_input), polled; else null
#endif
#if MK_FOLD
  const float* parts = nullptr;
  int nparts = 0;
  float* out = nullptr;
  int w0 = 0, w1 = 0;
#endif
};

__device__ __forceinline__ float4 operator+(float4 a, float4 b) {
  return make_float4(a.x + b.x, a.y + b.y, a.z + b.z, a.w + b.w);
}
__device__ __forceinline__ float2 operator+(float2 a, float2 b) {
  return make_float2(a.x + b.x, a.y + b.y);
}

// A folding reader's input vector V (float4 or float2): x, loaded from element offset `off`
// (column `col`), plus the partials there, in rank order; stored to `out` where designated.
template <typename V>
__device__ __forceinline__ V fold_input(const MatvecInput& in, int B, size_t off, int col, V x) {
#if MK_FOLD
  const size_t stride = static_cast<size_t>(in.ld) * B;
  for (int r = 0; r < in.nparts; ++r)
    x = x + __ldcg(reinterpret_cast<const V*>(in.parts + r * stride + off));
  if (col >= in.w0 && col < in.w1) *reinterpret_cast<V*>(in.out + off) = x;
#endif
  return x;
}

// f(std::true_type{}) for a folding input (-DMK_FOLD=1 builds only), else
// f(std::false_type{}): each staging loop is instantiated per case, the plain one as it was.
template <typename F>
__device__ __forceinline__ void with_fold(const MatvecInput& in, F&& f) {
#if MK_FOLD
  if (in.nparts) {
    f(std::true_type{});
    return;
  }
#endif
  f(std::false_type{});
}

// matrix: its column 0 (a K slice's first column); ld: its row length (K if 0).
__device__ __forceinline__ MatvecGeometry make_geometry(const __nv_bfloat16* matrix, int K,
                                                       int row0, int n, int B, int ld = 0) {
  MatvecGeometry g;
  g.ld = ld ? ld : K;
  g.w = matrix + static_cast<size_t>(row0) * g.ld;
  g.K = K;
  g.n = n;
  g.nt = tc_ntiles(B);
  if (g.nt) {
    // Activation chunks hold nt n-tiles of fp32-sized hi/lo bf16 pairs, whole k-steps of
    // 16 columns; a padded page fits a slot and holds at most a page of weights.
    g.kc = min(K, (kActFloats / (8 * g.nt)) & ~15);
    g.rpp = max(1, min(kPageElems / g.kc, kSlotBytes / g.stride(g.kc)));
  } else {
    g.kc = min(K, min(kPageElems, (kActFloats / B) & ~7));
    g.rpp = max(1, kPageElems / g.kc);
  }
  const int kc = g.kc;
  g.nchunks = (K + kc - 1) / kc;
  g.ngroups = (n + g.rpp - 1) / g.rpp;
  return g;
}

__device__ __forceinline__ bool is_matvec(int op) {
  return op == OP_QKV || op == OP_OPROJ || op == OP_GATEUP || op == OP_DOWN || op == OP_LMHEAD;
}

// Ops whose weights stream through the ring: the matvecs and (-DMK_FUSE_OPROJ=1) ATTN_OPROJ.
__device__ __forceinline__ bool has_pages(int op) {
  return is_matvec(op) || (kFuseOproj && op == OP_ATTN_OPROJ);
}

// ATTN_OPROJ's block of wo_t ([.., ld]): n rows from row0, K columns from col0, in chunks
// of at most kAxpyCols columns, each consumer thread owning 8 of a chunk's columns
// (ops/attn_oproj.cuh).
constexpr int kAxpyCols = 8 * kConsumerThreads;
__device__ __forceinline__ MatvecGeometry axpy_geometry(const __nv_bfloat16* matrix, int ld,
                                                        int row0, int n, int col0, int K) {
  MatvecGeometry g;
  g.w = matrix + static_cast<size_t>(row0) * ld + col0;
  g.K = K;
  g.ld = ld;
  g.n = n;
  g.nt = 0;  // unpadded rows
  g.kc = min(K, kAxpyCols);
  g.rpp = max(1, kPageElems / g.kc);
  g.nchunks = (K + g.kc - 1) / g.kc;
  g.ngroups = (n + g.rpp - 1) / g.rpp;
  return g;
}

// Geometry of any matvec instruction (the loader and the consumers both call this).
__device__ __forceinline__ MatvecGeometry matvec_geometry(const KernelArgs& a,
                                                          const int32_t* ins) {
  const int op = ins[W_OPCODE], l = ins[W_LAYER];
  const int row0 = ins[W_QKV_ROW0], n = ins[W_QKV_NROWS];  // same words for every matvec op
  const size_t d = a.d, I = a.I, HD = static_cast<size_t>(a.H) * a.D;
  const size_t nqkv = static_cast<size_t>(a.Hkv) * (a.H / a.Hkv + 2) * a.D;
  switch (op) {
    case OP_ATTN_OPROJ:
      return axpy_geometry(a.wo_t + l * HD * d, a.d,
                           ins[W_ATTN_OPROJ_HEAD] * a.D + ins[W_ATTN_OPROJ_DIM0],
                           ins[W_ATTN_OPROJ_NDIMS], ins[W_ATTN_OPROJ_COL0],
                           ins[W_ATTN_OPROJ_NCOLS]);
    case OP_QKV: return make_geometry(a.wqkv + l * nqkv * d, a.d, row0, n, a.B);
    case OP_OPROJ: return make_geometry(a.wo + l * d * HD, static_cast<int>(HD), row0, n, a.B);
    case OP_GATEUP: return make_geometry(a.wgu + l * 2 * I * d, a.d, row0, n, a.B);
    case OP_DOWN:  // kn > 0: the K slice [k0, k0 + kn) of I (isa.py)
      return ins[W_DOWN_KN] ? make_geometry(a.wdown + l * d * I + ins[W_DOWN_K0], ins[W_DOWN_KN],
                                            row0, n, a.B, a.I)
                            : make_geometry(a.wdown + l * d * I, a.I, row0, n, a.B);
    default: return make_geometry(a.lm_head, a.d, row0 - a.vocab0, n, a.B);  // OP_LMHEAD: global rows
  }
}

// Fields the consumers check before touching shared memory (the loader streams nothing more
// than the geometry says, so a rejected instruction only stops the block).
__device__ __forceinline__ bool matvec_valid(const KernelArgs& a, const int32_t* ins) {
  const int op = ins[W_OPCODE], row0 = ins[W_QKV_ROW0], n = ins[W_QKV_NROWS];
  const bool paired = op == OP_QKV || op == OP_GATEUP;
  const int first = op == OP_LMHEAD ? row0 - a.vocab0 : row0;
#if MK_FOLD
  const int fold = op == OP_QKV ? ins[W_QKV_FOLD] : op == OP_GATEUP ? ins[W_GATEUP_FOLD]
                   : op == OP_LMHEAD ? ins[W_LMHEAD_FOLD] : 0;
  if (fold != 0 && (a.part == nullptr || (op == OP_QKV && ins[W_LAYER] == 0))) return false;
#endif
  // A K slice: whole units inside I, this GPU's residual, copy (adds into resid[2l+3] too)
  // 0 or 1 and not on the last layer.
  if (op == OP_DOWN) {
    const int k0 = ins[W_DOWN_K0], kn = ins[W_DOWN_KN], copy = ins[W_DOWN_COPY];
    if (kn == 0 ? k0 != 0
                : (k0 < 0 || k0 % kDownKAlign != 0 || kn % kDownKAlign != 0 || k0 + kn > a.I ||
                   copy < 0 || copy > 1 || (copy && ins[W_LAYER] >= a.L - 1) ||
                   ins[W_ALL_RANKS] != 0))
      return false;
  }
  // GATEUP's copies (isa.py): copy 0..2 (2 not on the last layer), a range inside d,
  // this GPU's residual, no fold.
  if (op == OP_GATEUP && ins[W_GATEUP_COPY] != 0) {
    const int copy = ins[W_GATEUP_COPY], c0 = ins[W_GATEUP_SUM_COL0];
    const int nc = ins[W_GATEUP_SUM_NCOLS];
    if (copy < 0 || copy > 2 || (copy == 2 && ins[W_LAYER] >= a.L - 1) || a.tp != 1 ||
        ins[W_GATEUP_FOLD] != 0 || c0 < 0 || nc < 0 || c0 + nc > a.d)
      return false;
  }
  return n > 0 && first >= 0 && n * a.B <= kAccFloats &&
         (!paired || (row0 % 2 == 0 && n % 2 == 0));
}

// resid[level] as a matvec input; folded (isa.py) when the record's fold word (at
// word `fold`, followed by sum_col0, sum_ncols) is set.
__device__ __forceinline__ MatvecInput resid_input(const KernelArgs& a, const int32_t* ins,
                                                   int level, int fold,
                                                   const __nv_bfloat16* norm) {
  const size_t Bd = static_cast<size_t>(a.B) * a.d;
  MatvecInput in{a.resid + level * Bd, a.d, norm};
#if MK_FOLD
  if (ins[fold]) {  // matvec_valid checked level > 0 and a.part
    in.x -= Bd;
    in.parts = a.part + (level - 1) * a.tp * Bd;
    in.nparts = a.tp;
    in.out = a.resid + level * Bd;
    in.w0 = ins[fold + 1];
    in.w1 = in.w0 + ins[fold + 2];
  }
#endif
  return in;
}

// kLlX: where this record's input is the residual DOWN hands over as flagged elements,
// row 0 of them (x_ll[l - 1] for QKV of layer l >= 1, x_ll[L - 1] for LMHEAD), which the
// matvec polls instead of waiting on DOWN's counter; null where it waits and reads resid:
// tp > 1 (the residual comes from RESID_SUM or a fold), layer 0 (EMBED's), tensor cores
// (their staging copies resid asynchronously).
__device__ __forceinline__ const int32_t* x_ll_input(const KernelArgs& a, const int32_t* ins) {
  if (!kLlX || a.tp != 1 || (kTcCompiled && tc_ntiles(a.B) != 0)) return nullptr;
  const int op = ins[W_OPCODE], l = ins[W_LAYER];
  if (op == OP_QKV && l > 0) return x_ll_row(a, l - 1, 0);
  if (op == OP_LMHEAD) return x_ll_row(a, a.L - 1, 0);
  return nullptr;
}

// in with its flagged source (kLlX builds; the field exists only there).
__device__ __forceinline__ MatvecInput with_x_ll(const KernelArgs& a, const int32_t* ins,
                                                 MatvecInput in) {
#if MK_LL_X
  in.ll = x_ll_input(a, ins);
#endif
  return in;
}
__device__ __forceinline__ const int32_t* x_ll_of(const MatvecInput& in) {
#if MK_LL_X
  return in.ll;
#else
  return nullptr;
#endif
}

__device__ __forceinline__ MatvecInput matvec_input(const KernelArgs& a, const int32_t* ins) {
  const int op = ins[W_OPCODE], l = ins[W_LAYER];
  switch (op) {
    case OP_QKV:
      return with_x_ll(a, ins, resid_input(a, ins, 2 * l, W_QKV_FOLD,
                                           a.attn_norm + static_cast<size_t>(l) * a.d));
    case OP_OPROJ: return {a.attn + static_cast<size_t>(l) * a.B * a.H * a.D, a.H * a.D, nullptr};
    case OP_GATEUP:
      return resid_input(a, ins, 2 * l + 1, W_GATEUP_FOLD,
                         a.mlp_norm + static_cast<size_t>(l) * a.d);
    case OP_DOWN:  // from column k0 (0 unless a K slice)
      return {a.act + static_cast<size_t>(l) * a.B * a.I + ins[W_DOWN_K0], a.I, nullptr};
    default: return with_x_ll(a, ins, resid_input(a, ins, 2 * a.L, W_LMHEAD_FOLD, a.final_norm));
  }
}

}  // namespace mk
