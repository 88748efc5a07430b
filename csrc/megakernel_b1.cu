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
// This variant's batches (1-2) run on CUDA cores unless MK_TC_MIN_BUCKET <= 2. MK_B1_TC=0
// leaves the tensor-core matvec out of it (dead code there, but it holds registers): with
// -DMK_LL_Q=1 the variant then compiles without spills (with the tensor-core code, 8 bytes;
// bench/NOTES.md, session 32). 1 (default): compiled in, as measured so far.
#define MK_VARIANT_MAX_BATCH 2
#ifndef MK_B1_TC
#define MK_B1_TC 1
#endif
#if !MK_B1_TC
#define MK_TC_COMPILED 0
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
