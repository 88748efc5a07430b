// The loader warp: streams the weight pages of every matvec instruction of its SM's queue
// into the ring (ring.cuh) with bulk copies, running ahead across instruction boundaries
// without looking at counters (weights never depend on activations), and prefetches the
// small inputs of the instructions it passes into L2 (inputs.cuh). It walks the same page
// sequence as the consumers (matvec.cuh), derived from `matvec_geometry` alone.
#pragma once
#include "inputs.cuh"
#include "matvec_geometry.cuh"
#include "ring.cuh"

namespace mk {

// The pages of the matvec instructions of one SM queue, in the order the consumers take them.
// With `inputs`, the walk prefetches the inputs (inputs.cuh) of every instruction it passes,
// or (MK_INPUT_LEAD) of the one kInputLead instructions further on. With `claims` (the
// loader's own walk, where KernelArgs::claim is set) the queue goes on past the static one
// with the records this walk claims (claim_next), until the claim list runs dry.
struct PageWalk {
  const int32_t* queue;
  int qlen, i, p;          // instruction index (end: finished), page inside it
  int end;                 // qlen, or (claims) the queue's end once known
  bool inputs;
  bool claims;             // this walk claims (publishing to the ring's FIFO)
  MatvecGeometry g;

  __device__ void start(const KernelArgs& a, const Ring& ring, const int32_t* q, int n,
                        bool with_inputs, bool with_claims) {
    queue = q; qlen = n; i = -1; inputs = with_inputs;
    claims = kClaims && with_claims && a.claim_len > 0;
    end = claims ? INT32_MAX : qlen;
    for (int j = 0; inputs && j < kInputLead && j < qlen; ++j)
      prefetch_inputs(a, queue + static_cast<size_t>(j) * kWords, threadIdx.x & 31);
    next_instruction(a, ring);
  }
  __device__ bool done() const { return i >= end; }
  // Every lane: claim the record of queue index i (> the static queue) once the consumers
  // have begun index i - kClaimAhead, publish it in the FIFO (kClaimRec: with a copy of
  // its record by lanes 0-15, which the consumers read there, not from L2), and return it;
  // null when the list ran dry or the block stops. Claims are taken in increasing order
  // everywhere and static instructions never wait on claimed ones (validate.py), so the
  // smallest unfinished claimed instruction always runs: no deadlock.
  __device__ const int32_t* claim(const KernelArgs& a, const Ring& ring) {
    const int j = i - qlen, lane = threadIdx.x & 31;
    int k = -1;
    if (lane == 0) {
      while (get_flag(ring.started) < i - kClaimAhead && !*ring.abort) __nanosleep(64);
      if (!*ring.abort) k = atomicAdd(a.claim_next, 1);
      if (k >= a.claim_len) k = -1;
    }
    k = __shfl_sync(0xffffffffu, k, 0);
    const int32_t* rec = k < 0 ? nullptr : a.claim + static_cast<size_t>(k) * kWords;
    if (kClaimRec && rec && lane < kWords)
      set_flag(ring.claimrec + (j % kClaimSlots) * kWords + lane, rec[lane]);
    __syncwarp();
    if (lane == 0) {
      set_flag(ring.claimq + j % kClaimSlots, k);
      __threadfence_block();  // the entry and its record before the count that publishes them
      set_flag(ring.nclaimed, j + 1);
      if (a.claimed && j < a.claim_len)
        a.claimed[static_cast<size_t>(blockIdx.x) * a.claim_len + j] = k;
    }
    return rec;
  }
  __device__ void next_instruction(const KernelArgs& a, const Ring& ring) {
    p = 0;
    for (++i; i < end; ++i) {
      const int32_t* ins;
      if (!kClaims || i < qlen) {
        ins = queue + static_cast<size_t>(i) * kWords;
        if (inputs && i + kInputLead < qlen)  // every instruction once (kInputLead: start)
          prefetch_inputs(a, ins + kInputLead * kWords, threadIdx.x & 31);
      } else {
        ins = claim(a, ring);
        if (!ins) { end = i; return; }
        if (inputs) prefetch_inputs(a, ins, threadIdx.x & 31);
      }
      if (has_pages(__ldg(ins + W_OPCODE))) {
        g = matvec_geometry(a, ins);
        if (g.pages() > 0) return;
      }
    }
  }
  __device__ void advance(const KernelArgs& a, const Ring& ring) {
    if (++p >= g.pages()) next_instruction(a, ring);
  }
  // Row segments of the current page: rows, bytes per row, first element of row 0.
  __device__ int rows() const { return g.group_rows(p % g.ngroups); }
  __device__ uint32_t row_bytes() const { return g.chunk_cols(p / g.ngroups) * 2; }
  __device__ uint32_t row_stride() const { return g.stride(g.chunk_cols(p / g.ngroups)); }
  __device__ const __nv_bfloat16* row(int r) const {
    const int c = p / g.ngroups, grp = p % g.ngroups;
    return g.w + static_cast<size_t>(grp * g.rpp + r) * g.ld + static_cast<size_t>(c) * g.kc;
  }
};

// Loader warp: stream the pages of every matvec instruction of this SM's queue into the
// ring. kReleaseQuiet: it issues nothing from the moment an instruction's outputs are
// written (with MK_RELEASE_QUIET=1, for a matvec or ATTN_OPROJ, from its last page) until
// its release add is done: that release's fence waited for the memory operations the
// loader kept issuing (measured: 1.4-3.1 us per matvec release with the ring streaming,
// 0.5 us quiet); with kQuietWaitNs, on until the next instruction has passed its wait or
// kQuietWaitNs have passed. When
// the ring is full and its oldest page is still unconsumed after kL2StallNs (the consumers
// are in attention, a reduction or a counter wait), HBM would idle: the loader then pulls
// the next kL2PrefetchPages pages into L2 instead, so the bulk copies that later fill the
// ring with them hit L2.
template <bool kTiming>
__device__ void loader_main(const KernelArgs& a, const Ring& ring, const int32_t* queue,
                            int qlen) {
  const int lane = threadIdx.x & 31;
  const uint64_t policy = evict_first_policy();
  const bool l2_ahead = !(a.mode & (MODE_NO_PREFETCH | MODE_NO_LOAD)) && kL2PrefetchPages > 0;
  // The queue itself first: the walks below and the consumers read every instruction.
  if (kInputPrefetch && lane == 0 && qlen > 0) prefetch_l2(queue, qlen * kWords * sizeof(int32_t));
  PageWalk load, ahead;  // ahead: the next page to pull into L2 (each lane its own rows)
  load.start(a, ring, queue, qlen, kInputPrefetch, true);
  ahead.start(a, ring, queue, qlen, false, false);  // static pages only: it claims nothing
  uint32_t it = 0, ahead_it = 0;
  for (; !load.done(); load.advance(a, ring), ++it) {
    // The timing build stamps the loader's progress per page (KernelArgs::page_timing):
    // reached it (7), its slot free (4), the in-flight cap passed (5), issue (0), copies
    // issued (6): which wait holds the stream where the ring has room.
    if (kTiming && lane == 0) page_stamp<kTiming>(a, it, 7);
    if (a.mode & MODE_NO_PREFETCH) {
      while (*ring.ready < load.i && !*ring.abort) {}
      if (*ring.abort) break;
    }
    for (; l2_ahead && !ahead.done() && ahead_it < it; ahead.advance(a, ring), ++ahead_it) {}
    const int slot = ring.slot_of(it);
    const uint64_t wait_start = l2_ahead ? globaltimer() : 0;
    bool stop = false;
    while (!mbar_try_wait(&ring.empty[slot], ring.phase_of(it) ^ 1)) {
      if (*ring.abort) { stop = true; break; }
      if (l2_ahead && !(kReleaseQuiet && get_flag(ring.quiet)) && !ahead.done() &&
          ahead_it < it + kL2PrefetchPages &&
          globaltimer() - wait_start >= static_cast<uint64_t>(kL2StallNs)) {
        for (int r = 0; r < ahead.rows(); ++r) prefetch_lines(ahead.row(r), ahead.row_bytes(), lane);
        ahead.advance(a, ring);
        ++ahead_it;
      }
    }
    if (stop) break;
    if (kTiming && lane == 0) page_stamp<kTiming>(a, it, 4);
    // kInflightPages: page it - kInflightPages has landed before page it is issued. That
    // page's slot is not refilled before page it (the cap is below the slots), so its full
    // barrier's parity is unambiguous.
    // Before the quiet check: a release that turns quiet during this wait must not find a
    // copy issued after it (measured: ATTN's release 0.58 -> 1.28 us in that order).
    // kChainInflight: the cap while the consumers are on the attention chain.
    const int cap = kChainInflight && get_flag(ring.chain) ? kChainInflight : kInflightPages;
    if (cap > 0 && cap < ring.slots && it >= static_cast<uint32_t>(cap) &&
        !(a.mode & MODE_NO_LOAD)) {
      const uint32_t back = it - cap;
      while (!mbar_try_wait(&ring.full[ring.slot_of(back)], ring.phase_of(back))) {}
    }
    if (kTiming && lane == 0) page_stamp<kTiming>(a, it, 5);
    for (int q; kReleaseQuiet && (q = get_flag(ring.quiet)) != 0 && !*ring.abort;) {
      if (kQuietWaitNs && q == 2 &&  // past the release: quiet until the deadline at most
          static_cast<int32_t>(static_cast<uint32_t>(globaltimer()) -
                               static_cast<uint32_t>(get_flag(ring.quiet_until))) >= 0)
        break;
      __nanosleep(64);
    }
    if (kTiming && lane == 0) page_stamp<kTiming>(a, it, 0);
    if (a.mode & MODE_NO_LOAD) {
      if (lane == 0) mbar_arrive(&ring.full[slot]);
      if (kTiming && lane == 0) page_stamp<kTiming>(a, it, 6);
      continue;
    }
    const int rows = load.rows();
    const uint32_t row_bytes = load.row_bytes(), stride = load.row_stride();
    if (lane == 0) mbar_arrive_expect_tx(&ring.full[slot], row_bytes * rows);
    __syncwarp();
    unsigned char* dst = ring.slot_bytes(slot);
    // Rows go as copies of at most kCopyBytes (a 16 KB row as 4): a release's fence waits
    // for the copies in flight, and a short copy is done sooner.
    const uint32_t pieces = (row_bytes + kCopyBytes - 1) / kCopyBytes;
    for (uint32_t q = lane; q < rows * pieces; q += 32) {
      const uint32_t r = q / pieces, off = (q % pieces) * kCopyBytes;
      bulk_load(dst + r * stride + off, reinterpret_cast<const unsigned char*>(load.row(r)) + off,
                min(kCopyBytes, row_bytes - off), &ring.full[slot], policy);
    }
    if (kTiming && lane == 0) page_stamp<kTiming>(a, it, 6);
  }
  // Never leave the block with copies in flight: wait for the last fill of every slot.
  for (int s = 0; s < ring.slots && s < static_cast<int>(it); ++s) {
    const uint32_t last = it - 1 - ((it - 1 - s) % ring.slots);
    while (!mbar_try_wait(&ring.full[s], ring.phase_of(last))) {}
  }
}

}  // namespace mk
