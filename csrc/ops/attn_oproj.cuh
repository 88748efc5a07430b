// ATTN_OPROJ (plan option fuse_oproj, -DMK_FUSE_OPROJ=1): ATTN_REDUCE and OPROJ in one
// instruction, so a layer's attention block has one stage and one counter hop less.
// For q head h, dims [dim0, dim0 + nd): every batch row's merge of the NS partials (as
// ATTN_REDUCE) goes to shared memory, m[b, j]; then the nd rows h*D + dim0 + j of wo_t (the
// O projection transposed), columns [col0, col0 + ncols), stream through the ring as pages
// of whole row segments cut into column chunks (axpy_geometry). Each consumer thread owns 8
// columns of a chunk, acc[b][k] += m[b, j] * wo_t[row j][col + k]; a chunk narrower than
// kAxpyCols shares its rows among rg groups of threads, whose sums meet in shared memory.
// The sums are added to resid[2l+1] with fp32 atomics (red.global.add.v4.f32), onto the
// copy of resid[2l] that the previous DOWN (or EMBED) stored there; the release add after
// the block barrier publishes them as it does plain stores. Column slices cut the adds per
// residual element from (heads x dim slices) to heads: the release's fence waits for them.
#pragma once
#include "../matvec.cuh"
#include "../ring.cuh"
#include "attn_reduce.cuh"

namespace mk {
static_assert(kAccFloats >= kMaxBatch * kMaxD && kActFloats >= kAxpyCols,
              "ATTN_OPROJ's merged dims (acc) and row-group sums (act) fit shared memory");
struct AttnOprojOp {
  static constexpr int kPartRows = kActFloats / kAxpyCols;  // batch rows of part at a time
  __device__ static void red_add4(float* p, float4 v) {
    asm volatile("red.global.add.v4.f32 [%0], {%1, %2, %3, %4};"
                 :: "l"(p), "f"(v.x), "f"(v.y), "f"(v.z), "f"(v.w) : "memory");
  }
  // 8 consecutive floats p[0..7] += (lo, hi).
  __device__ static void red_add8(float* p, float4 lo, float4 hi) {
    red_add4(p, lo);
    red_add4(p + 4, hi);
  }

  __device__ static bool valid(const KernelArgs& a, const int32_t* ins) {
    const int h = ins[W_ATTN_OPROJ_HEAD], dim0 = ins[W_ATTN_OPROJ_DIM0];
    const int nd = ins[W_ATTN_OPROJ_NDIMS];
    const int col0 = ins[W_ATTN_OPROJ_COL0], ncols = ins[W_ATTN_OPROJ_NCOLS];
    return a.wo_t != nullptr && a.tp == 1 && a.B <= 8 && h >= 0 && h < a.H && dim0 >= 0 &&
           nd > 0 && dim0 + nd <= a.D && dim0 % 4 == 0 && nd % 4 == 0 && a.d % 8 == 0 &&
           a.B * nd <= kAccFloats && col0 >= 0 && ncols >= 8 && col0 + ncols <= a.d &&
           col0 % 4 == 0 && ncols % 8 == 0;
  }

  // Consumers, batch bucket BT (B <= BT: 1, 2, 4, 8). Fields checked by valid(). coef: B * nd
  // floats, part: kAxpyCols * min(B, kPartRows) floats of shared memory. Inlined, as the
  // interpreter is into the kernel: as a call it read the kernel's parameters through a
  // generic pointer, a load each (a.mode after every page's wait), and took ~2 us a page
  // where OPROJ takes 0.8.
  // kLlPartials: the partials come from part_ll, polled for tag epoch + 1 (the interpreter
  // waited on the first range alone: the residual's writer); ERR_WATCHDOG where they did
  // not come (the adds are then garbage; the interpreter reports it after the instruction,
  // as for ATTN's and a matvec's polls).
  template <int BT, bool kTiming>
  __device__ __forceinline__ static int run(const KernelArgs& a, const Ring& ring,
                                            const int32_t* ins, uint32_t& it, float* coef,
                                            float* part, int epoch) {
    const int l = ins[W_LAYER], h = ins[W_ATTN_OPROJ_HEAD], dim0 = ins[W_ATTN_OPROJ_DIM0];
    const int nd = ins[W_ATTN_OPROJ_NDIMS], B = a.B, tid = threadIdx.x;
    const int nv = nd / 4;  // vectors per batch row
    const int err = AttnReduceOp::merge_vectors<kLlPartials>(a, B * nv, [&](int v) {
      const int b = v / nv;
      return AttnReduceOp::MergeSource{(static_cast<size_t>(l) * B + b) * a.H + h,
                                       dim0 + (v - b * nv) * 4};
    }, [&](int v, float4 o) { *reinterpret_cast<float4*>(coef + v * 4) = o; }, true, epoch + 1);
    consumer_sync();  // coef[b * nd + j] complete
    phase_stamp(1);   // every thread's merge done (over thread 0's own, merge_vectors')
    const MatvecGeometry g = matvec_geometry(a, ins);
    const int tpr = g.kc / 8, rg = kConsumerThreads / tpr;  // threads per row, row groups
    const int grp = tid / tpr, col = 8 * (tid - grp * tpr);  // rows grp, grp + rg, ..
    const int d = a.d;
    float* out = a.resid + static_cast<size_t>(2 * l + 1) * B * d + ins[W_ATTN_OPROJ_COL0];
    for (int c = 0; c < g.nchunks; ++c) {
      const int cols = g.chunk_cols(c);
      const bool mine = grp < rg && col < cols;
      float acc[BT][8];
#pragma unroll
      for (int b = 0; b < BT; ++b)
#pragma unroll
        for (int k = 0; k < 8; ++k) acc[b][k] = 0.f;
      for (int pg = 0; pg < g.ngroups; ++pg) {
        consume_page<kTiming, 0>(a, ring, it, [&](const unsigned char* page) {
          if (!mine) return;
          const int rows = g.group_rows(pg), j0 = pg * g.rpp;
          for (int r = grp; r < rows; r += rg) {
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
        if (c == 0 && pg == 0) phase_stamp(2);  // warp 0 done with the first page
      }
      // As a matvec: no copies from the last page on, so the release fence finds none in
      // flight (1B b1 1.076 ms against 1.083-1.084 without, same process).
      if (kQuietFromLastPage && c == g.nchunks - 1 && tid == 0) set_flag(ring.quiet, 1);
      if (rg == 1) {
        if (mine) {
#pragma unroll
          for (int b = 0; b < BT; ++b) {
            if (BT > 1 && b >= B) break;
            red_add8(out + static_cast<size_t>(b) * d + c * g.kc + col,
                     make_float4(acc[b][0], acc[b][1], acc[b][2], acc[b][3]),
                     make_float4(acc[b][4], acc[b][5], acc[b][6], acc[b][7]));
          }
        }
        continue;
      }
      // rg > 1: the chunk is narrower than kAxpyCols, so it is the only one. The groups' sums
      // meet in part[(grp * nb + b - b0) * cols + col], each (b, 8 columns) added once, for
      // kPartRows batch rows b0.. at a time (part holds rg * cols * kPartRows floats).
      for (int b0 = 0; b0 < B; b0 += kPartRows) {
        const int nb = min(kPartRows, B - b0);
        if (b0 > 0) consumer_sync();  // every thread done reading the previous rows' part
        if (mine) {
#pragma unroll
          for (int b = 0; b < BT; ++b) {
            if (b < b0 || b >= b0 + nb) continue;
            float4* p = reinterpret_cast<float4*>(part + (grp * nb + b - b0) * cols + col);
            p[0] = make_float4(acc[b][0], acc[b][1], acc[b][2], acc[b][3]);
            p[1] = make_float4(acc[b][4], acc[b][5], acc[b][6], acc[b][7]);
          }
        }
        consumer_sync();
        for (int v = tid; v < nb * tpr; v += kConsumerThreads) {
          const int b = v / tpr, cc = 8 * (v - b * tpr);
          float4 s0 = make_float4(0.f, 0.f, 0.f, 0.f), s1 = s0;
          for (int q = 0; q < rg; ++q) {
            const float4* p = reinterpret_cast<const float4*>(part + (q * nb + b) * cols + cc);
            s0 = s0 + p[0];
            s1 = s1 + p[1];
          }
          red_add8(out + static_cast<size_t>(b0 + b) * d + cc, s0, s1);
        }
      }
    }
    phase_stamp(3);  // this thread's adds issued
    return err;
  }
};
}  // namespace mk
