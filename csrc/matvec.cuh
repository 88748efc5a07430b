// The matvec core shared by QKV, OPROJ, GATEUP, DOWN and LMHEAD.
//
// An instruction multiplies rows [row0, row0+n) of one bf16 weight matrix [N, K] by a
// [B, K] fp32 activation. Its weights are cut into pages of at most kPageBytes:
// columns in chunks of kc (sized so a [B, kc] activation chunk fits kActFloats), rows in
// groups of rpp, pages ordered chunk-major. The LOADER warp (loader.cuh) streams pages into
// the shared-memory ring (ring.cuh). The CONSUMER warps wait on counters, stage each
// activation chunk in shared memory (times the RMSNorm weight; 1/rms, a per-row constant,
// scales the sums afterwards), accumulate [n, B] fp32 partial sums, then run the op's
// epilogue.
// Both sides walk the same page sequence, derived from `matvec_geometry` alone.
// Batch buckets from kTcMinBucket up compute on tensor cores (matvec_tc.cuh) and change the
// page layout: rows padded to an odd multiple of 16 bytes, activation chunks of 8-column
// n-tiles. Buckets below it (batch 1 and 2) keep the CUDA-core layout and code here.
#pragma once
#include "matvec_geometry.cuh"

namespace mk {

// bf16 halves of a 32-bit word -> fp32, exactly (a bf16 is the top half of an fp32).
__device__ __forceinline__ float bf16_lo(uint32_t u) { return __uint_as_float(u << 16); }
__device__ __forceinline__ float bf16_hi(uint32_t u) { return __uint_as_float(u & 0xffff0000u); }

// Rows per warp tile: a tile shares each activation load among RB rows (shared-memory
// traffic per weight byte falls by RB; at batch 1 activations are 2x the weight bytes).
constexpr int kRowTile = 2;
// Batch 1, pages of at least this many rows (QKV, OPROJ, GATEUP, LMHEAD; DOWN's have 2):
// tiles of MK_ROW_TILE_B1 rows, halving the activation reads again (2: as other pages).
// Measured with 4 on the H100: 1% slower at 1B and 8B (and 20 bytes of spills).
#ifndef MK_ROW_TILE_B1
#define MK_ROW_TILE_B1 2
#endif
constexpr int kRowTileB1 = MK_ROW_TILE_B1;

// Activation chunk layout of the CUDA-core path: batch row b's cols columns as two planes,
// columns 8v..8v+3 at act[b*cols + 4v] and 8v+4..8v+7 at act[b*cols + cols/2 + 4v], so the
// 32 lanes of a warp reading vector v, v+1, ... each load one contiguous 512-byte run per
// plane (4 wavefronts) instead of two 1-KB runs at a 32-byte stride (8 each).
// s[j][b] += dot(weights of row j (8 bf16 in w), act[b][the 8 columns of vector v]);
// x: act + 4v, half: cols / 2.
template <int BT, int RB>
__device__ __forceinline__ void fma_vec(float (&s)[RB][BT], const uint4 (&w)[RB], const float* x,
                                        int cols, int half, int B) {
#pragma unroll
  for (int b = 0; b < BT; ++b) {
    if (BT > 1 && b >= B) break;
    const float4 x0 = *reinterpret_cast<const float4*>(x + b * cols);
    const float4 x1 = *reinterpret_cast<const float4*>(x + b * cols + half);
#pragma unroll
    for (int j = 0; j < RB; ++j) {
      float t0 = bf16_lo(w[j].x) * x0.x, t1 = bf16_hi(w[j].x) * x0.y;
      t0 = fmaf(bf16_lo(w[j].y), x0.z, t0); t1 = fmaf(bf16_hi(w[j].y), x0.w, t1);
      t0 = fmaf(bf16_lo(w[j].z), x1.x, t0); t1 = fmaf(bf16_hi(w[j].z), x1.y, t1);
      t0 = fmaf(bf16_lo(w[j].w), x1.z, t0); t1 = fmaf(bf16_hi(w[j].w), x1.w, t1);
      s[j][b] += t0 + t1;
    }
  }
}

// One page: rows x cols bf16 (row-major, stride cols) times act [B, cols] -> acc[row, b].
// Warps take tiles of RB rows; when a page has fewer tiles than warps, several warps split
// a tile's columns. Each warp adds its sums to acc: its own accumulators, or (shared_acc)
// ones it shares with the other warps, then atomically where a tile has several warps.
template <int BT, int RB>
__device__ void page_matvec(const unsigned char* page, int rows, int cols, int row_base,
                            const float* act, float* acc, int B, bool shared_acc) {
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const uint4* wv = reinterpret_cast<const uint4*>(page);
  const int vecs = cols >> 3;
  const int tiles = (rows + RB - 1) / RB;
  // Warps per tile: the largest power of two <= kConsumerWarps / tiles (at least 1), as
  // shifts: runtime divisions here cost ~60 instructions per page on every warp's critical
  // path (ncu, session 10). 32 - clz(tiles - 1) = ceil(log2(tiles)).
  const int lw = max(0, kLogConsumerWarps - (32 - __clz(tiles - 1)));
  const int wpt = 1 << lw;
  const int vstep = 32 * wpt;
  for (int t = warp >> lw; t < tiles; t += kConsumerWarps >> lw) {
    const int r0 = t * RB;
    float s[RB][BT];
#pragma unroll
    for (int j = 0; j < RB; ++j)
#pragma unroll
      for (int b = 0; b < BT; ++b) s[j][b] = 0.f;
    int v = (warp & (wpt - 1)) * 32 + lane;
    // A full 32 KB page gives every lane exactly 4 vectors per row: with kMvVec4, all their
    // loads are issued before the first FMA (one shared-memory latency per page, not two).
    // Off by default: the consumers alone got faster, the step 1% slower (H100 and H200).
    for (; kMvVec4 && BT <= 2 && v + 3 * vstep < vecs; v += 4 * vstep) {
      uint4 w[4][RB];
#pragma unroll
      for (int u = 0; u < 4; ++u)
#pragma unroll
        for (int j = 0; j < RB; ++j) w[u][j] = wv[min(r0 + j, rows - 1) * vecs + v + u * vstep];
#pragma unroll
      for (int u = 0; u < 4; ++u)
        fma_vec<BT, RB>(s, w[u], act + (v + u * vstep) * 4, cols, cols >> 1, B);
    }
    for (; v + vstep < vecs; v += 2 * vstep) {  // two vectors in flight per lane
      uint4 w0[RB], w1[RB];
#pragma unroll
      for (int j = 0; j < RB; ++j) {
        const int r = min(r0 + j, rows - 1);   // a short last tile repeats a row; not stored
        w0[j] = wv[r * vecs + v];
        w1[j] = wv[r * vecs + v + vstep];
      }
      fma_vec<BT, RB>(s, w0, act + v * 4, cols, cols >> 1, B);
      fma_vec<BT, RB>(s, w1, act + (v + vstep) * 4, cols, cols >> 1, B);
    }
    if (v < vecs) {
      uint4 w0[RB];
#pragma unroll
      for (int j = 0; j < RB; ++j) w0[j] = wv[min(r0 + j, rows - 1) * vecs + v];
      fma_vec<BT, RB>(s, w0, act + v * 4, cols, cols >> 1, B);
    }
    if constexpr (kMvScatter && BT <= 2) {
      // Reduce-scatter: RB*BT sums in log2(RB*BT) halving steps, then a plain butterfly:
      // (RB*BT - 1) + (5 - log2(RB*BT)) shuffles instead of 5 per sum. Lane l ends with
      // the warp's total of sum e = l / (32 / (RB*BT)).
      constexpr int E = RB * BT;
      static_assert((E & (E - 1)) == 0 && E <= 32, "sums per tile: a power of 2");
      float t[E];
#pragma unroll
      for (int e = 0; e < E; ++e) t[e] = s[e / BT][e % BT];
#pragma unroll
      for (int n = E, o = 16; n > 1; n >>= 1, o >>= 1) {
        const bool hi = lane & o;
#pragma unroll
        for (int k = 0; k < n / 2; ++k) {
          const float keep = hi ? t[k + n / 2] : t[k], give = hi ? t[k] : t[k + n / 2];
          t[k] = keep + __shfl_xor_sync(0xffffffffu, give, o);
        }
      }
      float sum = t[0];
#pragma unroll
      for (int o = 16 / E; o > 0; o >>= 1) sum += __shfl_xor_sync(0xffffffffu, sum, o);
      const int e = lane / (32 / E), j = e / BT, b = e % BT;
      if (lane % (32 / E) == 0 && b < B && r0 + j < rows) {
        float* out = acc + (row_base + r0 + j) * B + b;
        if (wpt == 1 || !shared_acc) *out += sum; else atomicAdd(out, sum);
      }
    } else {
#pragma unroll
      for (int j = 0; j < RB; ++j) {
#pragma unroll
        for (int b = 0; b < BT; ++b) {
          if (BT > 1 && b >= B) break;
          const float sum = warp_sum(s[j][b]);
          if (lane == 0 && r0 + j < rows) {
            float* out = acc + (row_base + r0 + j) * B + b;
            if (wpt == 1 || !shared_acc) *out += sum; else atomicAdd(out, sum);
          }
        }
      }
    }
  }
}

// Consumers: x[b, col0 : col0+cols] into act[b] (the two-plane layout above) with 16-byte
// loads; with a norm weight, x * weight is stored and this thread's sum of x^2 per batch row
// added to sums[b]. A thread's kStageVecs loads of a row are all issued before the first is
// used (a branch between them had made the compiler wait for each in turn).
template <int BT, bool kFold>
__device__ void stage_chunk(const MatvecInput& in, int col0, int cols, int B, float* act,
                            float (&sums)[BT]) {
  constexpr int kStageVecs = 8;  // 8 x 256 threads x 4 floats: a whole 8192-column row
  const int c4 = cols >> 2;
  const uint2* nw = in.norm ? reinterpret_cast<const uint2*>(in.norm + col0) : nullptr;
#pragma unroll
  for (int b = 0; b < BT; ++b) {
    if (b >= B) break;
    const size_t row = static_cast<size_t>(b) * in.ld + col0;
    const float4* src = reinterpret_cast<const float4*>(in.x + row);
    float* dst = act + b * cols;
    float sq = 0.f;
    for (int k0 = threadIdx.x; k0 < c4; k0 += kStageVecs * kConsumerThreads) {
      float4 x[kStageVecs];
      uint2 n[kStageVecs];
#pragma unroll
      for (int u = 0; u < kStageVecs; ++u) {
        const int k = k0 + u * kConsumerThreads;
        x[u] = k < c4 ? __ldcg(src + k) : make_float4(0.f, 0.f, 0.f, 0.f);
        n[u] = nw && k < c4 ? __ldg(nw + k) : make_uint2(0u, 0u);
      }
#pragma unroll
      for (int u = 0; u < kStageVecs; ++u) {
        const int k = k0 + u * kConsumerThreads;
        if (k >= c4) break;
        float4 v = x[u];
        if (kFold) v = fold_input(in, B, row + 4 * k, col0 + 4 * k, v);
        if (nw) {
          sq += v.x * v.x + v.y * v.y + v.z * v.z + v.w * v.w;
          v.x *= bf16_lo(n[u].x); v.y *= bf16_hi(n[u].x);
          v.z *= bf16_lo(n[u].y); v.w *= bf16_hi(n[u].y);
        }
        // columns 4k..4k+3: vector k/2, plane k%2
        *reinterpret_cast<float4*>(dst + (k & 1) * (cols >> 1) + (k >> 1) * 4) = v;
      }
    }
    sums[b] += sq;
  }
}

// kLlX: stage_chunk's work (x * norm into act, sums of x^2 into sums) on x[b, col0 :
// col0+cols] taken from the flagged elements at in.ll, two per 16-byte load, polled until
// every element's tag reads `tag`: MK_LL_X_PER loads of a thread in flight, the norm
// weights' lines prefetched into L1 before them (a prefetch holds no register), a sleep of
// MK_LL_X_SLEEP_NS after a sweep that left some missing. false: the wait ran past the
// watchdog or another SM reported an error (act then holds garbage).
template <int BT>
__device__ bool stage_chunk_ll(const KernelArgs& a, const MatvecInput& in, int col0, int cols,
                               int B, float* act, float (&sums)[BT], int tag) {
  constexpr int kPer = MK_LL_X_PER;  // pairs a thread polls at once
  const int half = cols >> 1, n = B * half, tid = threadIdx.x;
  // Pair i: batch row b, columns c, c + 1 of the chunk; its elements at in.ll + 2 * (b * ld
  // + col0 + c) int32s. Batches 1 and 2 without a division: the addresses stay one base
  // register plus constants where they can.
  auto row_of = [&](int i) { return BT == 1 ? 0 : BT == 2 ? int(i >= half) : i / half; };
  const int32_t* src = x_ll_of(in) + 2 * col0;
  const int row_step = 2 * in.ld - 4 * half;  // int32s from pair i of row b to row b + 1
  for (int base = 0; base < n; base += kPer * kConsumerThreads) {
    uint32_t pending = 0;
#pragma unroll
    for (int k = 0; k < kPer; ++k) {
      const int i = base + tid + k * kConsumerThreads;
      if (i < n) {
        pending |= 1u << k;
        if (in.norm) prefetch_l1(in.norm + col0 + 2 * (i - row_of(i) * half));
      }
    }
    uint64_t start = 0;
#pragma unroll 1
    for (uint32_t spins = 0; pending; ++spins) {
      ulonglong2 u[kPer];
#pragma unroll
      for (int k = 0; k < kPer; ++k) {
        const int i = base + tid + k * kConsumerThreads;
        if (pending >> k & 1) u[k] = ld_ll2(src + 4 * i + row_of(i) * row_step);
      }
#pragma unroll
      for (int k = 0; k < kPer; ++k) {
        if (!(pending >> k & 1) || !ll1_ready(u[k].x, tag) || !ll1_ready(u[k].y, tag)) continue;
        pending &= ~(1u << k);
        const int i = base + tid + k * kConsumerThreads, b = row_of(i), c = 2 * (i - b * half);
        const float x0 = ll1_value(u[k].x), x1 = ll1_value(u[k].y);
        const uint32_t nw =
            in.norm ? __ldg(reinterpret_cast<const uint32_t*>(in.norm + col0 + c)) : 0x3f803f80u;
#pragma unroll
        for (int bb = 0; bb < BT; ++bb)
          if (bb == b) sums[bb] += x0 * x0 + x1 * x1;
        // columns c, c + 1 of vector (c / 4) / 2, plane (c / 4) % 2 (stage_chunk's layout)
        const int v = c >> 2;
        *reinterpret_cast<float2*>(act + b * cols + (v & 1) * (cols >> 1) + (v >> 1) * 4 +
                                   (c & 3)) = make_float2(x0 * bf16_lo(nw), x1 * bf16_hi(nw));
      }
      if (!pending) break;
      if (ll_give_up(a, spins, start)) return false;
      if (MK_LL_X_SLEEP_NS > 0) __nanosleep(MK_LL_X_SLEEP_NS);
    }
  }
  return true;
}

// Stage-ahead (kStageAhead; batch 1-2, no norm, no fold): this thread's float4s of the
// [B, cols] chunk at col0 into registers, issued before the previous chunk's pages and
// stored to act (the layout of stage_chunk) after them, so the chunk's L2 round trip hides
// behind the pages instead of sitting between them. Float4 f of the chunk is row f >= c4's
// (B <= 2) column 4 (f - row c4).
constexpr int kAheadVecs = (kActFloats + 4 * kConsumerThreads - 1) / (4 * kConsumerThreads);
__device__ __forceinline__ void load_ahead(const MatvecInput& in, int col0, int cols, int B,
                                           float4 (&x)[kAheadVecs]) {
  const int c4 = cols >> 2;
#pragma unroll
  for (int u = 0; u < kAheadVecs; ++u) {
    const int f = threadIdx.x + u * kConsumerThreads, b = f >= c4;
    if (f < B * c4)
      x[u] = __ldcg(reinterpret_cast<const float4*>(in.x + b * in.ld + col0) + f - b * c4);
  }
}
__device__ __forceinline__ void store_ahead(const float4 (&x)[kAheadVecs], int cols, int B,
                                            float* act) {
  const int c4 = cols >> 2;
#pragma unroll
  for (int u = 0; u < kAheadVecs; ++u) {
    const int f = threadIdx.x + u * kConsumerThreads, b = f >= c4, k = f - b * c4;
    if (f < B * c4)
      *reinterpret_cast<float4*>(act + b * cols + (k & 1) * (cols >> 1) + (k >> 1) * 4) = x[u];
  }
}

// Consumers: rstd[b] = 1 / rms of row b from each warp's sum of squares red[warp, b].
__device__ __forceinline__ void rstd_from_warp_sums(int K, int B, float eps, const float* red,
                                                    float* rstd) {
  const int tid = threadIdx.x;
  consumer_sync();
  if (tid < B) {
    float t = 0.f;
    for (int w = 0; w < kConsumerWarps; ++w) t += red[w * kMaxBatch + tid];
    rstd[tid] = rsqrtf(t / K + eps);
  }
  consumer_sync();
}

// Consumers: rstd[b] = 1 / rms of row b from every thread's partial sums over K.
template <int BT>
__device__ void finish_rms(const float (&sums)[BT], int K, int B, float eps, float* red,
                           float* rstd) {
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
#pragma unroll
  for (int b = 0; b < BT; ++b) {
    if (b >= B) break;
    const float t = warp_sum(sums[b]);
    if (lane == 0) red[warp * kMaxBatch + b] = t;
  }
  rstd_from_warp_sums(K, B, eps, red, rstd);
}

// Consumers, after the pages (and a bar.sync): acc[i] for i < nb becomes the sum of the
// kConsumerWarps copies acc[w * nb + i] (own) times rstd of its batch row (norm).
__device__ __forceinline__ void finish_acc(float* acc, const float* rstd, int nb, int B,
                                           bool own, bool norm) {
  // Where B divides the thread count every i of this thread has batch row tid % B: one
  // rstd read. The empty asm keeps its address here: hoisted to the kernel's start (as
  // rstd[i % B] per i was, three addresses) it held a register across the whole loop and
  // spilled.
  const int tid = threadIdx.x;
  const bool one_row = kConsumerThreads % B == 0;
  int row = tid % B;
  asm volatile("" : "+r"(row));
  const float r0 = norm ? rstd[row] : 1.f;
  for (int i = tid; i < nb; i += kConsumerThreads) {
    float s = acc[i];
    if (own) {
#pragma unroll
      for (int w = 1; w < kConsumerWarps; ++w) s += acc[w * nb + i];
    }
    // only this thread touches acc[i] here
    acc[i] = norm ? s * (one_row ? r0 : rstd[i % B]) : s;
  }
}

// Consumers: the whole matvec of one instruction into acc[n, B]. `it` is the ring position
// shared with the loader's walk. BT: batch bucket (B <= BT). pre_src: this thread's
// epilogue inputs (PreLoad), loaded together with the first activation chunk and returned.
// kWarpAcc: where 8 copies of acc fit, warp w accumulates into acc[w * n * B ...] with plain
// adds and the copies are summed once after the pages, instead of a compare-and-swap loop
// on a shared word per row for every page whose tiles span several warps.
// wait / waited / late (kSetupFirst, the interpreter): when late, wait() runs warp 0's
// counter wait at the chunk loop's head, after the setup, and *waited (flags[0]) says after
// the bar.sync that follows whether it held (else this returns at once: the kernel stops).
// (Stage stamps need the other order: a stamp before the wait would go to the previous
// instruction's row.)
template <int BT, bool kTiming, typename Wait>
__device__ float2 consumer_matvec(const KernelArgs& a, const Ring& ring, const int32_t* ins,
                                 uint32_t& it, float* act, float* acc, float* red, float* rstd,
                                  const PreLoad& pre_src, Wait&& wait, volatile int* waited,
                                  bool late, int epoch) {
  const int tid = threadIdx.x, B = a.B;
  if (kStageStamps == 2) phase_stamp(1);  // entered
  float2 pre = make_float2(0.f, 0.f);
  const MatvecGeometry g = matvec_geometry(a, ins);
  const MatvecInput in = matvec_input(a, ins);
  const int nb = g.n * B;
  const bool own = kWarpAcc && nb * kConsumerWarps <= kAccFloats;
  float* const warp_acc = own ? acc + (tid >> 5) * nb : acc;
  for (int i = tid; i < (own ? nb * kConsumerWarps : nb); i += kConsumerThreads) acc[i] = 0.f;
  float sums[BT];
#pragma unroll
  for (int b = 0; b < BT; ++b) sums[b] = 0.f;
  // RMSNorm: rstd[b] is a constant of batch row b, so it factors out of every dot product:
  // the staging pass stores x * norm and gathers sum(x^2); rstd scales acc after the pages.
  bool ahead = kStageAhead && BT <= 2 && g.nchunks > 1 && !in.norm;
#if MK_FOLD
  ahead = ahead && !in.nparts;
#endif
  float4 next[kAheadVecs];  // chunk c + 1, when ahead
  for (int c = 0; c < g.nchunks; ++c) {
    const int cols = g.chunk_cols(c), col0 = c * g.kc;
    if (kStageStamps && c == 0) phase_stamp(kStageStamps);  // set up, before the bar.sync
    if (kSetupFirst && late && c == 0) wait();
    consumer_sync();  // every warp is done with the previous chunk (late: and warp 0's wait)
    if (kSetupFirst && late && c == 0 && !*waited) return pre;
    if (kQuietInputs >= 2 && c == 0 && tid == 0) set_flag(ring.quiet, 1);
    if (c == 0) pre = pre_src.load();  // in flight with the chunk's loads
    if (ahead && c > 0) {
      store_ahead(next, cols, B, act);
    } else if (kLlX && x_ll_of(in)) {
      if (!stage_chunk_ll<BT>(a, in, col0, cols, B, act, sums, epoch + 1))
        waited[1] = ERR_WATCHDOG;  // flags[1]: reported after the epilogue
    } else {
      with_fold(in, [&](auto fold) {
        stage_chunk<BT, decltype(fold)::value>(in, col0, cols, B, act, sums);
      });
    }
    if (kStageStamps == 1 && c == 0) phase_stamp(2);  // thread 0's loads back, stored
    consumer_sync();
    if (c == 0) phase_stamp(0);  // first activation chunk staged
    if (kQuietInputs >= 2 && c == 0 && tid == 0) set_flag(ring.quiet, 0);
    if (ahead && c + 1 < g.nchunks)
      load_ahead(in, col0 + g.kc, g.chunk_cols(c + 1), B, next);
    for (int grp = 0; grp < g.ngroups; ++grp) {
      consume_page<kTiming, kRingSlots<false>>(a, ring, it, [&](const unsigned char* page) {
        const int rows = g.group_rows(grp);
        if (BT == 1 && kRowTileB1 > kRowTile && rows >= kRowTileB1)
          page_matvec<BT, kRowTileB1>(page, rows, cols, grp * g.rpp, act, warp_acc, B, !own);
        else
          page_matvec<BT, kRowTile>(page, rows, cols, grp * g.rpp, act, warp_acc, B, !own);
      });
      if (!kStageStamps && c == 0 && grp == 0) phase_stamp(1);  // warp 0: first page done
    }
  }
  if (!kStageStamps) phase_stamp(2);  // warp 0 done with the last page
  if (kQuietFromLastPage && tid == 0) set_flag(ring.quiet, 1);  // cleared after the release
  if (in.norm) finish_rms<BT>(sums, g.K, B, a.eps, red, rstd);  // its barriers complete acc
  else if (own) consumer_sync();
  if (own || in.norm) finish_acc(acc, rstd, nb, B, own, in.norm != nullptr);
  consumer_sync();  // acc complete
  if (!kStageStamps) phase_stamp(3);
  return pre;
}

}  // namespace mk
