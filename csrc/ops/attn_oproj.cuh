// ATTN_OPROJ (plan option fuse_oproj, -DMK_FUSE_OPROJ=1): ATTN_REDUCE and OPROJ in one
// instruction, so a layer's attention block has one stage and one counter hop less.
// For q head h, dims [dim0, dim0 + nd): every batch row's merge of the NS partials (as
// ATTN_REDUCE) goes to shared memory, m[b, j]; then the nd rows h*D + dim0 + j of wo_t (the
// O projection transposed, contiguous) stream through the ring as pages of whole rows cut
// into column chunks (axpy_geometry), and each consumer thread accumulates 8 output columns
// of a chunk, acc[b][k] += m[b, j] * wo_t[row j][col + k]: no reduction across threads.
// A chunk's sums are added to resid[2l+1] with fp32 atomics (red.global.add.v4.f32), onto the
// copy of resid[2l] that the previous DOWN (or EMBED) stored there; the release add after
// the block barrier publishes them as it does plain stores.
#pragma once
#include "../matvec.cuh"
#include "../ring.cuh"
#include "attn_reduce.cuh"

namespace mk {
struct AttnOprojOp {
  __device__ static void red_add4(float* p, float x, float y, float z, float w) {
    asm volatile("red.global.add.v4.f32 [%0], {%1, %2, %3, %4};"
                 :: "l"(p), "f"(x), "f"(y), "f"(z), "f"(w) : "memory");
  }

  __device__ static bool valid(const KernelArgs& a, const int32_t* ins) {
    const int h = ins[W_ATTN_OPROJ_HEAD], dim0 = ins[W_ATTN_OPROJ_DIM0];
    const int nd = ins[W_ATTN_OPROJ_NDIMS];
    return a.wo_t != nullptr && a.tp == 1 && a.B <= 4 && h >= 0 && h < a.H && dim0 >= 0 &&
           nd > 0 && dim0 + nd <= a.D && dim0 % 4 == 0 && nd % 4 == 0 && a.d % 8 == 0 &&
           a.B * nd <= kActFloats;
  }

  // Consumers, batch bucket BT (B <= BT). Fields checked by valid(). Not inlined: the
  // interpreter's registers stay allocated as in a build without this op.
  template <int BT, bool kTiming>
  __device__ __noinline__ static void run(const KernelArgs& a, const Ring& ring,
                                          const int32_t* ins, uint32_t& it, float* coef) {
    const int l = ins[W_LAYER], h = ins[W_ATTN_OPROJ_HEAD], dim0 = ins[W_ATTN_OPROJ_DIM0];
    const int nd = ins[W_ATTN_OPROJ_NDIMS], B = a.B, tid = threadIdx.x;
    const int nv = nd / 4;  // vectors per batch row
    AttnReduceOp::merge_vectors(a, B * nv, [&](int v) {
      const int b = v / nv;
      return AttnReduceOp::MergeSource{(static_cast<size_t>(l) * B + b) * a.H + h,
                                       dim0 + (v - b * nv) * 4};
    }, [&](int v, float4 o) { *reinterpret_cast<float4*>(coef + v * 4) = o; }, true);
    consumer_sync();  // coef[b * nd + j] complete
    const MatvecGeometry g = matvec_geometry(a, ins);
    float* out = a.resid + static_cast<size_t>(2 * l + 1) * B * a.d;
    const int col = 8 * tid;  // this thread's first column of every chunk
    for (int c = 0; c < g.nchunks; ++c) {
      const int cols = g.chunk_cols(c);
      float acc[BT][8];
#pragma unroll
      for (int b = 0; b < BT; ++b)
#pragma unroll
        for (int k = 0; k < 8; ++k) acc[b][k] = 0.f;
      for (int grp = 0; grp < g.ngroups; ++grp) {
        consume_page<kTiming, 0>(a, ring, it, [&](const unsigned char* page) {
          if (col >= cols) return;
          const int rows = g.group_rows(grp), j0 = grp * g.rpp;
          for (int r = 0; r < rows; ++r) {
            const uint4 w = *reinterpret_cast<const uint4*>(page + (r * cols + col) * 2);
            const float wf[8] = {bf16_lo(w.x), bf16_hi(w.x), bf16_lo(w.y), bf16_hi(w.y),
                                 bf16_lo(w.z), bf16_hi(w.z), bf16_lo(w.w), bf16_hi(w.w)};
#pragma unroll
            for (int b = 0; b < BT; ++b) {
              if (BT > 1 && b >= B) break;
              const float m = coef[b * nd + j0 + r];
#pragma unroll
              for (int k = 0; k < 8; ++k) acc[b][k] = fmaf(m, wf[k], acc[b][k]);
            }
          }
        });
        if (c == 0 && grp == 0) phase_stamp(2);  // warp 0 done with the first page
      }
      if (col < cols) {
#pragma unroll
        for (int b = 0; b < BT; ++b) {
          if (BT > 1 && b >= B) break;
          float* o = out + static_cast<size_t>(b) * a.d + c * g.kc + col;
          red_add4(o, acc[b][0], acc[b][1], acc[b][2], acc[b][3]);
          red_add4(o + 4, acc[b][4], acc[b][5], acc[b][6], acc[b][7]);
        }
      }
    }
    phase_stamp(3);  // this thread's adds issued
  }
};
}  // namespace mk
