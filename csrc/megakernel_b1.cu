// The interpreter again, in namespace mk_b1, with the shared-memory layout of batches 1-2:
// a staging area sized for them (activation chunks of 4096 floats, 4096 accumulators,
// attention groups of at most 4 q heads) and the memory that frees as a sixth ring slot.
// At batch 1 the attention chain's window loads about two rings' worth of pages per SM and
// nothing else can stream there, so every slot more moves a page per SM out of the
// HBM-bound MLP window (bench/NOTES.md, session 23). megakernel/runtime.py choose_variant
// runs it at batches 1-2 where the program fits (b1_limits below); the KernelArgs ABI is mk's.
#include "kernel_args.h"

namespace mk_b1 {
using namespace ::mk;  // the ABI (KernelArgs, PeerBuffers) and the generated instruction set
}

// Build flags of an ablation apply to both variants; these are the variant's own defaults.
#ifndef MK_ACT_FLOATS
#define MK_ACT_FLOATS 4096
#endif
#ifndef MK_ACC_FLOATS
#define MK_ACC_FLOATS 4096
#endif
#ifndef MK_MAX_G
#define MK_MAX_G 4
#endif
#ifndef MK_NUM_PAGES
#define MK_NUM_PAGES 5
#endif
// MK_B1_STAGE_AHEAD: MK_STAGE_AHEAD for this variant alone, on by default (its 4096-float
// chunks take 16 registers a thread to hold). At batch 2 DOWN stages four chunks of 2048
// columns: ahead, 1.169 ms against 1.225 (1B; 1.189 in the default build); batch 1 the
// same (bench/NOTES.md, session 24).
#ifndef MK_B1_STAGE_AHEAD
#define MK_B1_STAGE_AHEAD 1
#endif
#ifndef MK_STAGE_AHEAD
#define MK_STAGE_AHEAD MK_B1_STAGE_AHEAD
#endif
// This variant's batches (1-2) run on CUDA cores unless MK_TC_MIN_BUCKET <= 2, so by default
// it leaves the tensor-core matvec out (dead code here that still holds registers):
// MK_B1_TC=1 compiles it in. Without it the plain kernel has the registers MK_LL_Q needs
// (with it, 8 bytes spill). 1B batch 1: 1.045 ms against 1.052 with it; batch 2 1.115
// against 1.127 (bench/NOTES.md, session 33).
#define MK_VARIANT_MAX_BATCH 2
#ifndef MK_B1_TC
#if defined(MK_TC_MIN_BUCKET) && MK_TC_MIN_BUCKET <= MK_VARIANT_MAX_BATCH
#define MK_B1_TC 1
#else
#define MK_B1_TC 0
#endif
#endif
#if !MK_B1_TC
#define MK_TC_COMPILED 0
#endif
// MK_LL_Q (common.cuh) is on in this variant wherever the tensor-core code is out (it needs
// the registers that frees) and the tp partials are not folded (with MK_FOLD, whose QKV
// keeps its release for its other readers, it spills 28 bytes, 16 without): QKV hands q
// and the new k / v to ATTN as flagged pairs, no counter hop. 1B batch 1: 1.034 ms against
// 1.045 (both with MK_B1_TC=0), batch 2 1.109 against 1.115, 8B batch 1 5.288 against
// 5.320. At batch 8 (the other build) it costs 0.5-0.8% (session 32), so that one keeps it
// off. -DMK_LL_Q=0 / 1 sets it here too.
#ifndef MK_LL_Q
#if MK_B1_TC || MK_FOLD
#define MK_LL_Q 0
#else
#define MK_LL_Q 1
#endif
#endif
// MK_LL_PARTIALS (common.cuh) is on in this variant under the warpgroups (at 168 registers
// it spills): the fused plan's ATTN_OPROJ polls ATTN's partials, so ATTN signals without a
// release. 1B batch 1: 1.013 / 1.011 ms against 1.026 / 1.024 with the warpgroups alone
// and 1.038 / 1.034 with neither (session 34's kernel), batch 2 1.081 against 1.098 and
// 1.102, 8B batch 1 5.268 against 5.284 and 5.294 (H100, same process, session 35). At
// batch 8 (the other build, the warpgroups on) it cost 0.5%, so that one keeps it off.
#ifndef MK_LL_PARTIALS
#if defined(MK_WARPGROUPS) && !MK_WARPGROUPS
#define MK_LL_PARTIALS 0
#else
#define MK_LL_PARTIALS 1
#endif
#endif

#define mk mk_b1
#include "megakernel.cu"
#undef mk

namespace mk_b1 {
// What the runtime checks a program against before it picks this variant.
int max_batch() { return kVariantMaxBatch; }
int acc_floats() { return kAccFloats; }
int max_group() { return kMaxG; }
}  // namespace mk_b1
