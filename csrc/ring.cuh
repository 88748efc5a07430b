// The shared-memory ring between the loader warp (loader.cuh) and the consumer warps: its
// slots and mbarriers, and how the consumers take a page and give its slot back. The ring
// has kNumPages slots, or one more (kRawSlot) when the batch runs on CUDA cores; both sides
// count pages the same way, so page `it` is in slot it % slots.
#pragma once
#include "common.cuh"

namespace mk {

struct Ring {
  unsigned char* pages;    // slots * kSlotBytes (slot kNumPages: the raw area, kRawSlot)
  int slots;               // kNumPages or kNumPages + 1; loader and consumers agree
  uint64_t* full;          // [slots] loader -> consumers (tx bytes)
  uint64_t* empty;         // [slots] consumers -> loader (kEmptyArrivals per page)
  volatile int* abort;     // set by consumers when the block stops early
  volatile int* ready;     // queue index whose waits the consumers have passed (NO_PREFETCH)
  volatile int* quiet;     // kReleaseQuiet: the consumers' release is near, issue nothing
                           // (1); kQuietWaitNs: past the release, until quiet_until (2)
  volatile int* quiet_until;  // kQuietWaitNs: %globaltimer's low 32 bits when quiet 2 ends
  volatile int* chain;     // kChainInflight: the consumers are on the attention chain
  // Claims (KernelArgs::claim): the loader claims records and hands them to the consumers
  // in order through a FIFO of kClaimSlots claim indices (-1: the list ran dry).
  volatile int* started;   // queue index (static, then claimed) the consumers have begun
  volatile int* nclaimed;  // claims published so far (the dry one included)
  volatile int* claimq;    // [kClaimSlots] claim j in claimq[j % kClaimSlots]
  volatile int* claimrec;  // [kClaimSlots][kWords] claim j's record (kClaimRec)
  __device__ unsigned char* slot_bytes(int s) const {
    return pages + static_cast<size_t>(s) * kSlotBytes;
  }
  // Ring page `it` (this SM's count of pages so far) lives in slot it % slots, filled for
  // the (it / slots)-th time: the parity its mbarriers are at. The consumers know `slots`
  // at compile time (kRingSlots of their matvec path), the loader at run time.
  __device__ int slot_of(uint32_t it) const {
    return static_cast<int>(slots == kNumPages ? it % kNumPages : it % kMaxSlots);
  }
  __device__ uint32_t phase_of(uint32_t it) const {
    return (slots == kNumPages ? it / kNumPages : it / kMaxSlots) & 1;
  }
};

// Arrivals that free a ring slot: one per consumer warp, or one per consumer thread.
constexpr int kEmptyArrivals = kWarpRelease ? kConsumerWarps : kConsumerThreads;

// Consumers: this thread is done reading ring slot `slot`. An mbarrier arrive orders only
// the arriving thread's accesses, so every thread arrives; or (kWarpRelease) the __syncwarp
// orders the warp's reads before its lane 0 arrives: 8 arrivals instead of 256. Off by
// default: it measured no faster, and racecheck cannot see the __syncwarp's ordering (it
// reports each page's reads as racing with the next bulk copy into the slot).
__device__ __forceinline__ void release_slot(const Ring& ring, int slot) {
  if (kWarpRelease) {
    __syncwarp();
    if ((threadIdx.x & 31) == 0) mbar_arrive(&ring.empty[slot]);
  } else {
    mbar_arrive(&ring.empty[slot]);
  }
}

// Timing build: stamp k (< kPageStamps) of ring page `it` (the launch's page count on this
// SM), see KernelArgs::page_timing. Compiled out of the kernel without timing.
template <bool kTiming>
__device__ __forceinline__ void page_stamp(const KernelArgs& a, uint32_t it, int k) {
  if (kTiming && a.page_timing && it < static_cast<uint32_t>(a.page_max))
    a.page_timing[(static_cast<size_t>(blockIdx.x) * a.page_max + it) * kPageStamps + k] =
        static_cast<int64_t>(globaltimer());
}

// Ring slots of a launch whose matvecs run on tensor cores (kTc) or on CUDA cores: the
// megakernel sets Ring::slots to the same value.
template <bool kTc>
constexpr int kRingSlots = kTc ? kNumPages : kMaxSlots;

// Consumers: take ring page `it` (wait for its copy to land), run use(page) on it unless
// MODE_NO_COMPUTE, give the slot back to the loader and advance `it`. The timing build
// stamps the wait's start and end and the page's release (thread 0). kSlots: the ring's
// slots (kRingSlots of the caller's path), or 0: Ring::slots, read at run time.
template <bool kTiming, int kSlots, typename F>
__device__ __forceinline__ void consume_page(const KernelArgs& a, const Ring& ring, uint32_t& it,
                                             F&& use) {
  const int slot = kSlots ? static_cast<int>(it % kSlots) : ring.slot_of(it);
  const uint32_t parity = kSlots ? (it / kSlots) & 1 : ring.phase_of(it);
  const bool stamp = kTiming && threadIdx.x == 0;
  if (stamp) page_stamp<kTiming>(a, it, 1);
  while (!mbar_try_wait(&ring.full[slot], parity)) {}
  if (stamp) page_stamp<kTiming>(a, it, 2);
  if (!(a.mode & MODE_NO_COMPUTE)) use(ring.slot_bytes(slot));
  release_slot(ring, slot);
  if (stamp) page_stamp<kTiming>(a, it, 3);
  ++it;
}

}  // namespace mk
