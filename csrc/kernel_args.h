// The one kernel argument: every pointer and size the interpreter needs.
// Plain C++ (no torch): built by the Python runtime through the thin binding, passed by
// value as a __grid_constant__ parameter. Layouts are those of scheduler/isa.py.
#pragma once
#include <cstdint>
#include <cuda_bf16.h>

#include "generated/isa.cuh"

namespace mk {

constexpr int kMaxTp = 8;
constexpr int kPageStamps = 8;     // stamps per ring page in KernelArgs::page_timing

// What a rank's peer stores and signals reach on one rank (this rank's own included).
// Tensor parallelism runs one process driving every GPU with peer access enabled, so these
// are plain device pointers into the peers' memory (unified addressing).
struct PeerBuffers {
  float* part;                     // [2L, TP, B, d]
  float* logits;                   // [B, V]
  float* amax_val;                 // [B, NLM]
  int32_t* amax_idx;               // [B, NLM]
  int32_t* counters;               // [num_counters]
  int32_t* error;                  // [8]
};

struct KernelArgs {
  // Program
  const int32_t* instructions;     // [num_sms, max_len, kWords]
  const int32_t* queue_len;        // [num_sms]
  const int32_t* counter_targets;  // [num_counters]
  int32_t* counters;               // [num_counters], monotonic across steps
  int32_t* epoch;                  // [1] steps completed since reset
  int32_t* done;                   // [1] blocks finished, monotonic
  int32_t* error;                  // [8] code, sm, queue index, uid, counter, value, target, opcode
  int64_t* timing;                 // [num_sms, timing_len, 4] wait start, wait end, end, outputs
                                   // written (before the release add) (ns), or null:
                                   // null launches the instantiation built without timing code
  int max_len;
  // Records the SMs claim at run time (plan policy "queue", option claim_tail): after its
  // static queue every SM takes the next unclaimed one with an atomic add on claim_next and
  // runs it, until the list runs dry. In uid order, every uid above the static queues'.
  const int32_t* claim;            // [claim_len, kWords], or null (no claims)
  int claim_len;
  int32_t* claim_next;             // [1] next unclaimed record; 0 at a launch's start (the
                                   // last block to finish a step puts it back to 0)
  int32_t* claimed;                // [num_sms, claim_len] timing builds: SM s's claims in
                                   // order, -1 after its last; or null
  int timing_len;                  // rows of timing / phase_timing per SM: max_len + claim_len
  int64_t* page_timing;            // [num_sms, page_max, kPageStamps] per ring page (ns):
                                   // 0 loader issue, 1 consumer warp 0 wait start, 2 wait
                                   // end, 3 page done; the loader's own progress: 7 reached
                                   // the page, 4 its slot free, 5 the in-flight cap passed
                                   // (page it - cap landed), 6 its copies issued (lane 0);
                                   // null unless timing
  int page_max;
  int64_t* phase_timing;           // [num_sms, timing_len, 4] stamps an op takes inside an
                                   // instruction (ns, phase_stamp in common.cuh), or null;
                                   // written only by a build with -DMK_PHASE_STAMPS=1

  // Packed weights (bf16)
  const __nv_bfloat16* embed;      // [V, d]
  const __nv_bfloat16* lm_head;    // [V, d]
  const __nv_bfloat16* final_norm; // [d]
  const __nv_bfloat16* attn_norm;  // [L, d]
  const __nv_bfloat16* mlp_norm;   // [L, d]
  const __nv_bfloat16* wqkv;       // [L, Hkv*(G+2)*D, d]
  const __nv_bfloat16* wo;         // [L, d, H*D]
  const __nv_bfloat16* wgu;        // [L, 2I, d]
  const __nv_bfloat16* wdown;      // [L, d, I]
  const __nv_bfloat16* wo_t;       // [L, H*D, d] wo transposed (ATTN_OPROJ), or null

  // Buffers
  const int64_t* tokens;           // [B]
  const int32_t* pos;              // [B]
  float* resid;                    // [2L+1, B, d]
  float* q;                        // [L, B, H, D]
  int32_t* q_ll;                   // [L, B, H, D/2, 4] q as flagged pairs (-DMK_LL_Q=1):
                                   // unit u = dims (u, u + D/2), tag epoch + 1
  int32_t* kv_ll;                  // [L, B, Hkv, 2, D/2, 4] this step's k (unit u = dims u,
                                   // u + D/2) and v (dims 2u, 2u + 1), bf16 values as floats
  __nv_bfloat16* k_cache;          // [L, B, Hkv, S, D]
  __nv_bfloat16* v_cache;          // [L, B, Hkv, S, D]
  float* o_part;                   // [L, B, H, NS, D]
  float* lse;                      // [L, B, H, NS]
  int32_t* part_ll;                // [L, B, H, NS, D/2 + 1, 4] o_part and lse as flagged pairs
                                   // (-DMK_LL_PARTIALS=1; common.cuh st_ll), tag epoch + 1
  float* attn;                     // [L, B, H*D]
  float* act;                      // [L, B, I]
  float* logits;                   // [B, V]
  float* amax_val;                 // [B, NLM]
  int32_t* amax_idx;               // [B, NLM]
  int64_t* out_tokens;             // [B]
  const float* rope_cos;           // [S, D/2]
  const float* rope_sin;           // [S, D/2]
  float* part;                     // [2L, TP, B, d] under tp > 1, else null

  // Tensor parallelism (tp == 1: rank 0, vocab0 0, peers unused)
  int tp, rank;
  int vocab0;                      // first vocab row of this rank's lm_head shard
  PeerBuffers peers[kMaxTp];       // [tp], indexed by rank
  int counts_step;                 // 1: this launch ends a step (bumps done, advances epoch);
                                   // 0: one phase of a step split over several launches

  // Sizes
  int B, d, I, L, H, Hkv, D, V, S, NS, NLM, num_counters;
  float eps;
  int64_t watchdog_ns;             // budget of one wait before the kernel reports and stops
  int mode;                        // ablation switches (Mode), 0 = everything on
  int32_t* x_ll;                   // [L, B, d, 2] resid[2l+2] as flagged elements {x, tag}
                                   // (-DMK_LL_X=1: DOWN of layer l writes, tag epoch + 1)
};

// Ablation switches. NO_COMPUTE / NO_LOAD give wrong results: they time one half of the
// matvec pipeline alone.
enum Mode : int {
  MODE_NO_PREFETCH = 1,   // the loader starts an instruction's pages only once its waits hold
  MODE_NO_COMPUTE = 2,    // consumers take pages without computing on them
  MODE_NO_LOAD = 4,       // the loader hands over pages without copying weights into them
  MODE_LOCAL_COMM = 8,    // tp > 1: all-rank stores and signals stay on this rank (the
                          // NCCL-between-launches ablation moves the data between phases)
};

// Host entry points, defined in megakernel.cu.
size_t smem_bytes();
int threads_per_block();
// Launches grid = num_sms persistent blocks on `stream`; returns a cudaError_t value.
int launch(const KernelArgs& args, int num_sms, void* stream);
// Largest number of co-resident blocks of this kernel per SM on the current device.
int max_blocks_per_sm();
// Whether this build runs claimed records (-DMK_CLAIMS=1); without, it would skip them.
bool claims_compiled();
// Whether QKV hands ATTN its q and new k / v as flagged pairs (MK_LL_Q; q_ll, kv_ll).
bool ll_q_compiled();
// Whether DOWN hands QKV / LMHEAD the residual as flagged elements (MK_LL_X; x_ll).
bool ll_x_compiled();
// Whether ATTN hands its partials' reader (ATTN_REDUCE / ATTN_OPROJ) flagged pairs
// (MK_LL_PARTIALS; part_ll).
bool ll_partials_compiled();

}  // namespace mk
