// The tensor-core matvec of the batch buckets from kTcMinBucket up; matvec.cuh owns the ring,
// the page walk and the geometry (MatvecGeometry::nt > 0 selects the layout used here).
//
// Per page, acc[rows, B] += W[rows, cols] x act[B, cols]^T with mma.sync m16n8k16 (bf16 in,
// fp32 accumulate): weights are the A operand (16 rows x 16 k, ldmatrix.x4 from the page,
// whose rows are padded to an odd number of 16-byte units so ldmatrix is conflict-free),
// activations the B operand (16 k x 8 batch columns). Activations are fp32: each is split
// into hi = bf16(x) and lo = bf16(x - hi), and both go through the MMA, so a product loses
// ~2^-17 of its size instead of bf16's 2^-9.
//
// Activation chunk in shared memory (`frag`, uint4 [k-steps][nt][32 lanes]): lane l of
// k-step s, n-tile j holds for batch row 8j + l/4 and columns k = 16s + 2(l%4):
// {hi(k, k+1), hi(k+8, k+9), lo(k, k+1), lo(k+8, k+9)}, the B fragments of both MMAs, read
// with one conflict-free 16-byte load per lane. Rows b >= B and columns past the chunk are 0.
//
// Work split: a page has mt = ceil(rows/16) m-tiles. With fewer than 8, wpt = 8/mt warps
// share a tile, each taking a contiguous 1/wpt of its k-steps, and add their sums to acc
// with shared atomics. An instruction with one row group has the same rows on every page:
// its warps then keep their sums in registers across pages and add them to acc once.
#pragma once
#include "matvec.cuh"

namespace mk {

__device__ __forceinline__ void ldsm_x4(uint32_t (&r)[4], uint32_t addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(addr) : "memory");
}

// d += a (16 x 16 bf16, row-major) x b (16 x 8 bf16, column-major), fp32 accumulators.
__device__ __forceinline__ void mma_bf16(float (&d)[4], const uint32_t (&a)[4], uint32_t b0,
                                         uint32_t b1) {
  asm("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 "
      "{%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// (x.x, x.y) as bf16 pairs hi = bf16(x) and lo = bf16(x - hi) (x - hi is exact in fp32).
__device__ __forceinline__ void split_bf16(float2 x, uint32_t& hi, uint32_t& lo) {
  const __nv_bfloat162 h = __float22bfloat162_rn(x);
  const float2 hf = __bfloat1622float2(h);
  const __nv_bfloat162 l = __floats2bfloat162_rn(x.x - hf.x, x.y - hf.y);
  hi = reinterpret_cast<const uint32_t&>(h);
  lo = reinterpret_cast<const uint32_t&>(l);
}

// Staging an activation chunk takes two steps, so that chunk c+1 is on its way while the
// pages of chunk c compute: load_chunk_tc starts per-thread 16-byte async copies of the raw
// fp32 rows into `raw` (coalesced: a warp copies 512 contiguous bytes, four whole L2 lines),
// and stage_chunk_tc, once they have landed, converts them into `frag`. Loading straight
// into the fragment layout (8 rows x 32 bytes per warp load, one load round trip after the
// other) had made a chunk cost ~3.7 us of L2 latency at batch 8: DOWN stages 8 of them.
// raw: [rows][kc + kRawPad] fp32; the pad puts the 8 rows a warp reads in different banks.
constexpr int kRawPad = 8;
// 8 nt rows of kActFloats / (8 nt) columns, each plus the pad:
constexpr int kRawFloats = kActFloats + kMaxBatch * kRawPad;
// k-steps a consumer thread converts per chunk: a chunk has kActFloats / (8 nt) columns,
// i.e. kActFloats / (128 nt) k-steps, over kConsumerWarps / nt warps.
constexpr int kStageSteps = kActFloats / (16 * 8 * kConsumerWarps);
static_assert(kActFloats % (16 * 8 * kConsumerWarps) == 0, "whole k-steps per consumer warp");

// Consumers: start the copies of x[b, col0 : col0+cols] for b < B into raw (row stride rs),
// and pull the chunk's norm weights into L1 for stage_chunk_tc (registers holding them
// across the pages would spill); then cp_async_wait_all + consumer_sync before it runs.
__device__ __forceinline__ void load_chunk_tc(const MatvecInput& in, int col0, int cols, int B,
                                              float* raw, int rs) {
  const int v4 = cols >> 2;  // cols is a multiple of 8
  for (int i = threadIdx.x; i < B * v4; i += kConsumerThreads) {
    const int b = i / v4, v = i - b * v4;
    cp_async16(raw + b * rs + 4 * v, in.x + static_cast<size_t>(b) * in.ld + col0 + 4 * v);
  }
  cp_async_commit();
  if (in.norm && threadIdx.x * 64 < cols)  // 64 bf16 per 128-byte line
    asm volatile("prefetch.global.L1 [%0];" :: "l"(in.norm + col0 + threadIdx.x * 64));
}

// Consumers: the chunk in raw (times the norm weight) into `frag`. Thread t always holds
// batch row 8 (warp % NT) + lane/4, so its sum of x^2 is the one float `sq`.
template <int NT, bool kFold>
__device__ void stage_chunk_tc(const MatvecInput& in, int col0, int cols, int B, const float* raw,
                               int rs, uint4* frag, float& sq) {
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int b = 8 * (warp % NT) + (lane >> 2), ksteps = (cols + 15) >> 4;
  const bool live = b < B;
  uint32_t nrm[kStageSteps][2];  // norm weights of (k, k+1), (k+8, k+9): all loads first
  const unsigned* nw = in.norm ? reinterpret_cast<const unsigned*>(in.norm + col0) : nullptr;
#pragma unroll
  for (int u = 0; u < kStageSteps; ++u) {
    const int s = warp / NT + u * (kConsumerWarps / NT), k = 16 * s + 2 * (lane & 3);
    nrm[u][0] = nw && s < ksteps ? __ldg(nw + k / 2) : 0u;
    nrm[u][1] = nw && s < ksteps && k + 8 < cols ? __ldg(nw + k / 2 + 4) : 0u;
  }
  const float* xr = raw + min(b, B - 1) * rs;
  const size_t row = static_cast<size_t>(min(b, B - 1)) * in.ld + col0;  // kFold: x's offset
#pragma unroll
  for (int u = 0; u < kStageSteps; ++u) {
    const int s = warp / NT + u * (kConsumerWarps / NT), k = 16 * s + 2 * (lane & 3);
    if (s >= ksteps) break;
    const bool upper = k + 8 < cols;  // false only in a k-step cut to 8 columns
    float2 v0 = make_float2(0.f, 0.f), v1 = v0;  // columns (k, k+1) and (k+8, k+9)
    if (live) {
      v0 = *reinterpret_cast<const float2*>(xr + k);
      if (upper) v1 = *reinterpret_cast<const float2*>(xr + k + 8);
      if (kFold) {
        v0 = fold_input(in, B, row + k, col0 + k, v0);
        if (upper) v1 = fold_input(in, B, row + k + 8, col0 + k + 8, v1);
      }
      if (nw) {
        sq += v0.x * v0.x + v0.y * v0.y + v1.x * v1.x + v1.y * v1.y;
        v0.x *= bf16_lo(nrm[u][0]); v0.y *= bf16_hi(nrm[u][0]);
        v1.x *= bf16_lo(nrm[u][1]); v1.y *= bf16_hi(nrm[u][1]);
      }
    }
    uint4 f;
    split_bf16(v0, f.x, f.z);
    split_bf16(v1, f.y, f.w);
    frag[(s * NT + warp % NT) * 32 + lane] = f;
  }
}

// Adds a warp's sums for one m-tile to acc[row0 + r, b] and zeroes them. part[2j] (hi) and
// part[2j+1] (lo) element e of lane (g, q) = (lane/4, lane%4): row g + 8 (e/2), batch
// column 8j + 2q + e%2. rot >= 0: other warps add to the same words, so atomically; each
// starts at element rot, so warps sharing a tile rarely retry their CAS on the same word.
template <int NT>
__device__ __forceinline__ void flush_tile(float (&part)[2 * NT][4], float* acc, int row0,
                                           int rows, int B, int rot) {
  constexpr int E = 4 * NT;
  const int lane = threadIdx.x & 31, g = lane >> 2, q = lane & 3;
  float v[E];
#pragma unroll
  for (int e = 0; e < E; ++e) {
    v[e] = part[2 * (e >> 2)][e & 3] + part[2 * (e >> 2) + 1][e & 3];
    part[2 * (e >> 2)][e & 3] = part[2 * (e >> 2) + 1][e & 3] = 0.f;
  }
  if (rot < 0) {
#pragma unroll
    for (int e = 0; e < E; ++e) {
      const int r = g + 8 * ((e >> 1) & 1), b = 8 * (e >> 2) + 2 * q + (e & 1);
      if (r < rows && b < B) acc[(row0 + r) * B + b] += v[e];
    }
    return;
  }
#pragma unroll
  for (int sh = 1; sh < E; sh <<= 1) {  // v[i] <- v[(i + rot) % E], in log2(E) selects
    if (rot & sh) {
      float t[E];
#pragma unroll
      for (int i = 0; i < E; ++i) t[i] = v[(i + sh) % E];
#pragma unroll
      for (int i = 0; i < E; ++i) v[i] = t[i];
    }
  }
#pragma unroll
  for (int i = 0; i < E; ++i) {
    const int e = (i + rot) % E;
    const int r = g + 8 * ((e >> 1) & 1), b = 8 * (e >> 2) + 2 * q + (e & 1);
    if (r < rows && b < B) atomicAdd(acc + (row0 + r) * B + b, v[i]);
  }
}

// part[2j] += A x hi, part[2j+1] += A x lo of n-tile j: hi and lo in separate accumulators
// make two independent MMA chains per n-tile.
template <int NT>
__device__ __forceinline__ void mma_step(float (&part)[2 * NT][4], const uint32_t (&a)[4],
                                         const uint4 (&x)[NT]) {
#pragma unroll
  for (int j = 0; j < NT; ++j) {
    mma_bf16(part[2 * j], a, x[j].x, x[j].y);
    if (kTcSplit) mma_bf16(part[2 * j + 1], a, x[j].z, x[j].w);
  }
}

// One page: rows x cols bf16 (row stride `stride` bytes) times frag -> part, added to
// acc[row_base + r, b] when `flush` (else kept in part for the next page, same rows).
// own: acc is this warp's own copy (kTcWarpAcc), so plain adds even where warps share a tile.
template <int NT>
__device__ __forceinline__ void page_mma(const unsigned char* page, int stride, int rows,
                                         int cols, int row_base, const uint4* frag,
                                         float* acc, int B, float (&part)[2 * NT][4],
                                         bool flush, bool own = false) {
  static_assert(kConsumerWarps == 8, "warps per tile are 8 >> wsh");
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int mt = (rows + 15) >> 4, full = cols >> 4;      // m-tiles; k-steps of 16 columns
  const int wsh = mt >= 5 ? 0 : mt >= 3 ? 1 : 4 - mt;     // wpt = 8 / mt, a power of 2
  const int wpt = 1 << wsh, kp = warp & (wpt - 1);
  // This warp's k-steps: [s0, s0 + per) of the ceil(cols / 16), contiguous so that the
  // loads of consecutive steps are immediate offsets of one address.
  const int per = (((cols + 15) >> 4) + wpt - 1) >> wsh, s0 = kp * per;
  const int s1 = min(full, s0 + per);
  const bool tail = (cols & 8) && s0 <= full && full < s0 + per;  // a last step of 8 columns
  for (int t = warp >> wsh; t < mt; t += kConsumerWarps >> wsh) {
    // ldmatrix.x4: lanes 0-15 point at rows 0-15 of the tile at k 0..7 (a0, a1), lanes
    // 16-31 at the same rows at k 8..15 (a2, a3). A short tile repeats its last row (real
    // weights, never garbage); the sums of those rows are not stored.
    uint32_t a_addr = smem_addr(page) + min(t * 16 + (lane & 15), rows - 1) * stride +
                      (lane >> 4) * 16 + s0 * 32;
    const uint4* f = frag + s0 * NT * 32 + lane;
    int s = s0;
    for (; s + 4 <= s1; s += 4, a_addr += 4 * 32, f += 4 * NT * 32) {
      uint32_t a[4][4];  // 4 k-steps: every load before any MMA
      uint4 x[4][NT];
#pragma unroll
      for (int u = 0; u < 4; ++u) {
        ldsm_x4(a[u], a_addr + u * 32);
#pragma unroll
        for (int j = 0; j < NT; ++j) x[u][j] = f[(u * NT + j) * 32];
      }
#pragma unroll
      for (int u = 0; u < 4; ++u) mma_step<NT>(part, a[u], x[u]);
    }
    for (; s < s1; ++s, a_addr += 32, f += NT * 32) {
      uint32_t a[4];
      uint4 x[NT];
      ldsm_x4(a, a_addr);
#pragma unroll
      for (int j = 0; j < NT; ++j) x[j] = f[j * 32];
      mma_step<NT>(part, a, x);
    }
    if (tail) {
      uint32_t a[4];
      uint4 x[NT];
      ldsm_x4(a, a_addr - (lane >> 4) * 16);  // every lane inside its row
      a[2] = a[3] = 0u;                       // k 8..15 are not in the page
#pragma unroll
      for (int j = 0; j < NT; ++j) x[j] = f[j * 32];
      mma_step<NT>(part, a, x);
    }
    if (flush)
      flush_tile<NT>(part, acc, row_base + t * 16, rows - t * 16, B, wpt > 1 && !own ? kp : -1);
  }
}

// Consumers: the whole matvec of one instruction into acc[n, B] on tensor cores; the same
// contract as consumer_matvec (matvec.cuh, wait / waited / late included), plus raw:
// kRawFloats of shared memory for the chunk copies. NT: n-tiles, tc_ntiles(a.B).
template <int NT, bool kTiming, typename Wait>
__device__ float2 consumer_matvec_tc(const KernelArgs& a, const Ring& ring, const int32_t* ins,
                                    uint32_t& it, float* act, float* acc, float* red,
                                    float* rstd, const PreLoad& pre_src, float* raw,
                                    Wait&& wait, volatile int* waited, bool late) {
  float2 pre = make_float2(0.f, 0.f);
  const int tid = threadIdx.x, B = a.B;
  const MatvecGeometry g = matvec_geometry(a, ins);
  const MatvecInput in = matvec_input(a, ins);
  uint4* frag = reinterpret_cast<uint4*>(act);
  // One row group of at most one m-tile per warp: every page has the same rows and tiles.
  const bool carry = g.ngroups == 1 && g.n <= 16 * kConsumerWarps;
  // kTcWarpAcc: pages flushed into shared tiles go to per-warp copies of acc (summed once
  // after the pages) where 8 copies fit, instead of the CAS-spin atomics of flush_tile.
  const int nb = g.n * B;
  const bool own = kTcWarpAcc && !carry && nb * kConsumerWarps <= kAccFloats;
  float* const warp_acc = own ? acc + (tid >> 5) * nb : acc;
  for (int i = tid; i < (own ? nb * kConsumerWarps : nb); i += kConsumerThreads) acc[i] = 0.f;
  float sq = 0.f;
  float part[2 * NT][4];
#pragma unroll
  for (int j = 0; j < 2 * NT; ++j)
#pragma unroll
    for (int e = 0; e < 4; ++e) part[j][e] = 0.f;
  const int rs = g.kc + kRawPad;
  if (kSetupFirst && late) {  // set up: now warp 0's wait, before the first copies
    wait();
    consumer_sync();
    if (!*waited) return pre;
  }
  load_chunk_tc(in, 0, g.chunk_cols(0), B, raw, rs);
  pre = pre_src.load();  // in flight with the chunk's copies
  for (int c = 0; c < g.nchunks; ++c) {
    const int cols = g.chunk_cols(c), col0 = c * g.kc;
    cp_async_wait_all();
    consumer_sync();  // chunk c is in raw; every warp is done with frag (chunk c-1's pages)
    with_fold(in, [&](auto fold) {
      stage_chunk_tc<NT, decltype(fold)::value>(in, col0, cols, B, raw, rs, frag, sq);
    });
    consumer_sync();  // frag holds chunk c; raw is free
    if (c == 0) phase_stamp(0);  // first activation chunk staged (as matvec.cuh)
    if (c + 1 < g.nchunks) load_chunk_tc(in, col0 + g.kc, g.chunk_cols(c + 1), B, raw, rs);
    for (int grp = 0; grp < g.ngroups; ++grp) {
      consume_page<kTiming, kRingSlots<true>>(a, ring, it, [&](const unsigned char* page) {
        page_mma<NT>(page, g.stride(cols), g.group_rows(grp), cols, grp * g.rpp, frag,
                     warp_acc, B, part, !carry || c == g.nchunks - 1, own);
      });
      if (c == 0 && grp == 0) phase_stamp(1);
    }
  }
  phase_stamp(2);
  if (kQuietFromLastPage && tid == 0) set_flag(ring.quiet, 1);  // cleared after the release
  if (in.norm) {
    // Lanes 4i..4i+3 of a warp hold batch row 8 (warp % NT) + i.
    const int warp = tid >> 5, lane = tid & 31, b = 8 * (warp % NT) + (lane >> 2);
    float t = sq + __shfl_xor_sync(0xffffffffu, sq, 1);
    t += __shfl_xor_sync(0xffffffffu, t, 2);
    if ((lane & 3) == 0) {
      red[warp * kMaxBatch + b] = t;
      if (NT > 1) red[warp * kMaxBatch + (b ^ 8)] = 0.f;  // the other n-tile's rows
    }
    rstd_from_warp_sums(g.K, B, a.eps, red, rstd);  // its barriers also complete acc
  } else if (own) {
    consumer_sync();  // every warp's copy complete
  }
  if (own || in.norm) finish_acc(acc, rstd, nb, B, own, in.norm != nullptr);
  consumer_sync();  // acc complete
  phase_stamp(3);
  return pre;
}

}  // namespace mk
