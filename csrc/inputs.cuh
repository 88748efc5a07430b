// The small inputs of an instruction that no other instruction of the step writes (wait
// targets, RMSNorm weights, RoPE rows, the KV cache of past positions, embedding rows), and
// their prefetch into L2. The loader warp prefetches them as its page walk passes each
// instruction, well before the consumers reach it: a demand miss to HBM issued behind the
// ring's bulk copies waits for the whole HBM queue (several microseconds on an H100 streaming
// at full rate), and the consumers' first reads of these inputs sit on the critical path.
#pragma once
#include "common.cuh"

namespace mk {

#ifndef MK_INPUT_PREFETCH
#define MK_INPUT_PREFETCH 1  // 0: the consumers fetch these inputs on demand
#endif
#ifndef MK_PREFETCH_KV
#define MK_PREFETCH_KV 1     // 0: not the KV cache ranges (ATTN pipelines its own loads)
#endif
// How far ahead of the loader's page walk the prefetch runs, in instructions of the SM's
// queue (0: as the walk passes each one). The walk is a ring's worth of pages ahead of the
// consumers, a few microseconds, about what a miss takes behind the ring's copies. Measured
// on the H100: 3 and 6 (about a layer) are 1-1.5% slower at batch 1, ATTN no shorter.
#ifndef MK_INPUT_LEAD
#define MK_INPUT_LEAD 0
#endif
constexpr bool kInputPrefetch = MK_INPUT_PREFETCH != 0;
constexpr int kInputLead = MK_INPUT_LEAD;
static_assert(kInputLead >= 0, "MK_INPUT_LEAD: instructions, >= 0");
constexpr bool kPrefetchKv = MK_PREFETCH_KV != 0;

// Cache positions [s0, s1) of ATTN split s of a sequence at position p: with n = p + 1 and
// c = ceil(n / NS), the split covers [s*c, min(n, (s+1)*c)).
struct AttnRange {
  int s0, s1;
};
__device__ __forceinline__ AttnRange attn_range(const KernelArgs& a, int p, int s) {
  const int n = p + 1, chunk = (n + a.NS - 1) / a.NS;
  const int s0 = min(n, s * chunk);
  return {s0, min(n, s0 + chunk)};
}

// First element of kv head g's cache of layer l, batch row b ([L, B, Hkv, S, D]).
__device__ __forceinline__ size_t kv_offset(const KernelArgs& a, int l, int b, int g) {
  return ((static_cast<size_t>(l) * a.B + b) * a.Hkv + g) * a.S * a.D;
}

// Pull the 128-byte lines of [p, p + bytes) into L2, one line per lane at a time.
__device__ __forceinline__ void prefetch_lines(const void* p, size_t bytes, int lane) {
  const uintptr_t begin = reinterpret_cast<uintptr_t>(p), end = begin + bytes;
  for (uintptr_t x = (begin & ~uintptr_t{127}) + 128 * lane; x < end; x += 32 * 128)
    asm volatile("prefetch.global.L2 [%0];" :: "l"(x));
}

// One warp: prefetch the inputs of instruction `ins` listed above. Positions and tokens are
// read here: the host or the previous launch wrote them.
__device__ void prefetch_inputs(const KernelArgs& a, const int32_t* ins, int lane) {
  for (int w = 0; w < kNumWaits; ++w) {
    const int first = __ldg(ins + W_WAIT0_FIRST + 2 * w), count = __ldg(ins + W_WAIT0_COUNT + 2 * w);
    if (count > 0) prefetch_lines(a.counter_targets + first, count * sizeof(int32_t), lane);
  }
  const int op = __ldg(ins + W_OPCODE), l = __ldg(ins + W_LAYER);
  const size_t dbytes = static_cast<size_t>(a.d) * sizeof(__nv_bfloat16);
  switch (op) {
    case OP_QKV: {
      prefetch_lines(a.attn_norm + static_cast<size_t>(l) * a.d, dbytes, lane);
      const int half = a.D / 2;
      for (int b = 0; b < a.B; ++b) {
        const int p = a.pos[b];
        if (p < 0 || p >= a.S) continue;  // the op reports it
        prefetch_lines(a.rope_cos + static_cast<size_t>(p) * half, half * sizeof(float), lane);
        prefetch_lines(a.rope_sin + static_cast<size_t>(p) * half, half * sizeof(float), lane);
      }
      break;
    }
    case OP_GATEUP:
      prefetch_lines(a.mlp_norm + static_cast<size_t>(l) * a.d, dbytes, lane);
      break;
    case OP_LMHEAD:
      prefetch_lines(a.final_norm, dbytes, lane);
      break;
    case OP_ATTN: {
      if (!kPrefetchKv) break;
      const int b = __ldg(ins + W_ATTN_B), g = __ldg(ins + W_ATTN_KV_HEAD);
      const int p = a.pos[b];
      if (p < 0 || p >= a.S) break;
      const AttnRange r = attn_range(a, p, __ldg(ins + W_ATTN_SPLIT));
      const size_t off = kv_offset(a, l, b, g) + static_cast<size_t>(r.s0) * a.D;
      const size_t bytes = static_cast<size_t>(r.s1 - r.s0) * a.D * sizeof(__nv_bfloat16);
      prefetch_lines(a.k_cache + off, bytes, lane);
      prefetch_lines(a.v_cache + off, bytes, lane);
      break;
    }
    case OP_EMBED: {
      const int col0 = __ldg(ins + W_EMBED_COL0), n = __ldg(ins + W_EMBED_NCOLS);
      for (int b = 0; b < a.B; ++b) {
        const int64_t tok = a.tokens[b];
        if (tok < 0 || tok >= a.V || col0 < 0 || n <= 0) continue;  // the op reports it
        prefetch_lines(a.embed + tok * a.d + col0, n * sizeof(__nv_bfloat16), lane);
      }
      break;
    }
    default: break;  // the rest reads activations of this step
  }
}

}  // namespace mk
