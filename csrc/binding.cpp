// The only file that speaks torch: turns named tensors and sizes into one mk::KernelArgs,
// checking dtype, device and contiguity of every tensor, and launches on the current stream.
// A Launcher is built once per (program, buffers); launch() does no per-step Python work and
// is safe to capture in a CUDA graph.
#include <torch/extension.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>

#include "kernel_args.h"

// The batch-1/2 build of the interpreter (csrc/megakernel_b1.cu): mk's functions (declared
// in kernel_args.h) over another shared-memory layout, and the limits it takes.
namespace mk_b1 {
size_t smem_bytes();
int max_blocks_per_sm();
int launch(const mk::KernelArgs& args, int num_sms, void* stream);
int max_batch();
int acc_floats();
int max_group();
bool claims_compiled();
bool ll_q_compiled();
bool ll_x_compiled();
bool ll_partials_compiled();
}  // namespace mk_b1

namespace {

class Launcher {
 public:
  // peers (tensor parallelism): one dict per rank, this rank's own included, of the tensors
  // other ranks store into (PeerBuffers); their devices differ from this rank's.
  Launcher(py::dict tensors, py::dict sizes, int num_sms, py::list peers) : num_sms_(num_sms) {
    mk::KernelArgs& a = args_;
    a.instructions = ptr<int32_t>(tensors, "instructions", torch::kInt32);
    a.queue_len = ptr<int32_t>(tensors, "queue_len", torch::kInt32);
    a.counter_targets = ptr<int32_t>(tensors, "counter_targets", torch::kInt32);
    a.counters = ptr<int32_t>(tensors, "counters", torch::kInt32);
    a.epoch = ptr<int32_t>(tensors, "epoch", torch::kInt32);
    a.done = ptr<int32_t>(tensors, "done", torch::kInt32);
    a.error = ptr<int32_t>(tensors, "error", torch::kInt32);
    a.timing = tensors.contains("timing") && !tensors["timing"].is_none()
                   ? ptr<int64_t>(tensors, "timing", torch::kInt64) : nullptr;
    a.page_timing = tensors.contains("page_timing") && !tensors["page_timing"].is_none()
                        ? ptr<int64_t>(tensors, "page_timing", torch::kInt64) : nullptr;
    TORCH_CHECK(!a.page_timing || a.timing, "megakernel: 'page_timing' needs 'timing'");
    a.phase_timing = tensors.contains("phase_timing") && !tensors["phase_timing"].is_none()
                         ? ptr<int64_t>(tensors, "phase_timing", torch::kInt64) : nullptr;
    TORCH_CHECK(!a.phase_timing || a.timing, "megakernel: 'phase_timing' needs 'timing'");
    a.embed = bf16(tensors, "embed");
    a.lm_head = bf16(tensors, "lm_head");
    a.final_norm = bf16(tensors, "final_norm");
    a.attn_norm = bf16(tensors, "attn_norm");
    a.mlp_norm = bf16(tensors, "mlp_norm");
    a.wqkv = bf16(tensors, "wqkv");
    a.wo = bf16(tensors, "wo");
    a.wgu = bf16(tensors, "wgu");
    a.wdown = bf16(tensors, "wdown");
    a.wo_t = tensors.contains("wo_t") && !tensors["wo_t"].is_none() ? bf16(tensors, "wo_t")
                                                                     : nullptr;
    a.tokens = ptr<int64_t>(tensors, "tokens", torch::kInt64);
    a.pos = ptr<int32_t>(tensors, "pos", torch::kInt32);
    a.resid = ptr<float>(tensors, "resid", torch::kFloat32);
    a.q = ptr<float>(tensors, "q", torch::kFloat32);
    a.q_ll = ptr<int32_t>(tensors, "q_ll", torch::kInt32);
    a.kv_ll = ptr<int32_t>(tensors, "kv_ll", torch::kInt32);
    a.x_ll = ptr<int32_t>(tensors, "x_ll", torch::kInt32);
    a.k_cache = ptr<__nv_bfloat16>(tensors, "k_cache", torch::kBFloat16);
    a.v_cache = ptr<__nv_bfloat16>(tensors, "v_cache", torch::kBFloat16);
    a.o_part = ptr<float>(tensors, "o_part", torch::kFloat32);
    a.lse = ptr<float>(tensors, "lse", torch::kFloat32);
    a.part_ll = ptr<int32_t>(tensors, "part_ll", torch::kInt32);
    a.attn = ptr<float>(tensors, "attn", torch::kFloat32);
    a.act = ptr<float>(tensors, "act", torch::kFloat32);
    a.logits = ptr<float>(tensors, "logits", torch::kFloat32);
    a.amax_val = ptr<float>(tensors, "amax_val", torch::kFloat32);
    a.amax_idx = ptr<int32_t>(tensors, "amax_idx", torch::kInt32);
    a.out_tokens = ptr<int64_t>(tensors, "out_tokens", torch::kInt64);
    a.rope_cos = ptr<float>(tensors, "rope_cos", torch::kFloat32);
    a.rope_sin = ptr<float>(tensors, "rope_sin", torch::kFloat32);
    a.part = tensors.contains("part") && !tensors["part"].is_none()
                 ? ptr<float>(tensors, "part", torch::kFloat32) : nullptr;
    a.max_len = size(sizes, "max_len");
    // Claims: a program of policy "queue" or with claim_tail (scheduler/program.py).
    a.claim_len = sizes.contains("claim_len") ? size(sizes, "claim_len") : 0;
    TORCH_CHECK(a.claim_len >= 0, "megakernel: claim_len must be >= 0, got ", a.claim_len);
    if (a.claim_len > 0) {
      a.claim = ptr<int32_t>(tensors, "claim", torch::kInt32);
      a.claim_next = ptr<int32_t>(tensors, "claim_next", torch::kInt32);
      TORCH_CHECK(tensors["claim"].cast<torch::Tensor>().numel() ==
                      static_cast<int64_t>(a.claim_len) * mk::kWords,
                  "megakernel: 'claim' must be [claim_len, ", mk::kWords, "]");
      TORCH_CHECK(sizes.contains("tp") == false || size(sizes, "tp") == 1,
                  "megakernel: claimed instructions need tp = 1");
    }
    a.claimed = a.claim && a.timing && tensors.contains("claimed") && !tensors["claimed"].is_none()
                    ? ptr<int32_t>(tensors, "claimed", torch::kInt32) : nullptr;
    TORCH_CHECK(!a.claimed || tensors["claimed"].cast<torch::Tensor>().numel() ==
                                  static_cast<int64_t>(num_sms) * a.claim_len,
                "megakernel: 'claimed' must be [num_sms, claim_len]");
    a.timing_len = a.max_len + a.claim_len;
    TORCH_CHECK(!a.timing || tensors["timing"].cast<torch::Tensor>().numel() ==
                                 static_cast<int64_t>(num_sms) * a.timing_len * 4,
                "megakernel: 'timing' must be [num_sms, max_len + claim_len, 4]");
    a.page_max = a.page_timing ? size(sizes, "page_max") : 0;
    TORCH_CHECK(!a.page_timing || (tensors["page_timing"].cast<torch::Tensor>().numel() ==
                                   static_cast<int64_t>(num_sms) * a.page_max * mk::kPageStamps),
                "megakernel: 'page_timing' must be [num_sms, page_max, ", mk::kPageStamps, "]");
    a.B = size(sizes, "B");
    a.d = size(sizes, "d");
    a.I = size(sizes, "I");
    a.L = size(sizes, "L");
    a.H = size(sizes, "H");
    a.Hkv = size(sizes, "Hkv");
    a.D = size(sizes, "D");
    a.V = size(sizes, "V");
    a.S = size(sizes, "S");
    a.NS = size(sizes, "NS");
    a.NLM = size(sizes, "NLM");
    a.num_counters = size(sizes, "num_counters");
    a.eps = sizes["eps"].cast<float>();
    a.watchdog_ns = sizes["watchdog_ns"].cast<int64_t>();
    a.mode = sizes.contains("mode") ? sizes["mode"].cast<int>() : 0;
    a.tp = sizes.contains("tp") ? size(sizes, "tp") : 1;
    a.rank = sizes.contains("rank") ? size(sizes, "rank") : 0;
    a.vocab0 = sizes.contains("vocab0") ? size(sizes, "vocab0") : 0;
    a.counts_step = sizes.contains("counts_step") ? size(sizes, "counts_step") : 1;
    // 1: the batch-1/2 build (megakernel_b1.cu), which the runtime picks only for programs
    // within b1_limits(); its kernel refuses instructions past them all the same.
    b1_ = sizes.contains("variant") && size(sizes, "variant") == 1;
    TORCH_CHECK(!sizes.contains("variant") || size(sizes, "variant") == 0 || b1_,
                "megakernel: variant must be 0 (default) or 1 (batch 1-2), got ",
                size(sizes, "variant"));
    TORCH_CHECK(a.claim_len == 0 || (b1_ ? mk_b1::claims_compiled() : mk::claims_compiled()),
                "megakernel: claimed instructions need a kernel built with -DMK_CLAIMS=1");
    TORCH_CHECK(!b1_ || (a.B <= mk_b1::max_batch() && a.H <= mk_b1::max_group() * a.Hkv),
                "megakernel: the batch-1/2 variant takes batches up to ", mk_b1::max_batch(),
                " and groups of up to ", mk_b1::max_group(), " q heads, got B=", a.B,
                ", H/Hkv=", a.H, "/", a.Hkv);
    TORCH_CHECK(a.tp >= 1 && a.tp <= mk::kMaxTp, "megakernel: tp must be in 1..", mk::kMaxTp,
                ", got ", a.tp);
    TORCH_CHECK(a.rank >= 0 && a.rank < a.tp, "megakernel: rank ", a.rank, " outside 0..",
                a.tp - 1);
    TORCH_CHECK(a.tp == 1 || (a.part && static_cast<int>(peers.size()) == a.tp),
                "megakernel: tp=", a.tp, " needs the 'part' tensor and one peer entry per rank, "
                "got ", peers.size());
    for (int r = 0; r < static_cast<int>(peers.size()); ++r) {
      py::dict p = peers[r].cast<py::dict>();
      mk::PeerBuffers& pb = a.peers[r];
      pb.part = peer<float>(p, r, "part", torch::kFloat32);
      pb.logits = peer<float>(p, r, "logits", torch::kFloat32);
      pb.amax_val = peer<float>(p, r, "amax_val", torch::kFloat32);
      pb.amax_idx = peer<int32_t>(p, r, "amax_idx", torch::kInt32);
      pb.counters = peer<int32_t>(p, r, "counters", torch::kInt32);
      pb.error = peer<int32_t>(p, r, "error", torch::kInt32);
    }
    TORCH_CHECK(a.tp == 1 || (a.peers[a.rank].part == a.part &&
                              a.peers[a.rank].counters == a.counters),
                "megakernel: peer entry ", a.rank, " must be this rank's own buffers");
  }

  void launch() {
    const c10::cuda::CUDAGuard guard(device_);
    void* stream = at::cuda::getCurrentCUDAStream().stream();
    const int err = b1_ ? mk_b1::launch(args_, num_sms_, stream)
                        : mk::launch(args_, num_sms_, stream);
    TORCH_CHECK(err == cudaSuccess, "megakernel launch failed: ",
                cudaGetErrorString(static_cast<cudaError_t>(err)));
  }

 private:
  // The tensor `name` of `from`, checked CUDA, typed, contiguous and 16-byte aligned, kept
  // alive. `what` names it in errors ("tensor", "peer 1 tensor").
  torch::Tensor checked(py::dict& from, const std::string& what, const char* name,
                        torch::ScalarType dtype) {
    TORCH_CHECK(from.contains(name), "megakernel: missing ", what, " '", name, "'");
    torch::Tensor t = from[name].cast<torch::Tensor>();
    TORCH_CHECK(t.is_cuda(), "megakernel: ", what, " '", name, "' must be on a CUDA device");
    TORCH_CHECK(t.scalar_type() == dtype, "megakernel: ", what, " '", name, "' must be ",
                c10::toString(dtype), ", got ", t.scalar_type());
    TORCH_CHECK(t.is_contiguous(), "megakernel: ", what, " '", name, "' must be contiguous");
    TORCH_CHECK(reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0,
                "megakernel: ", what, " '", name, "' must be 16-byte aligned");
    keep_.push_back(t);
    return t;
  }
  // This rank's tensor: on the same device as the others.
  template <typename T>
  T* ptr(py::dict& tensors, const char* name, torch::ScalarType dtype) {
    const bool first = keep_.empty();
    torch::Tensor t = checked(tensors, "tensor", name, dtype);
    if (first) device_ = t.device();
    TORCH_CHECK(t.device() == device_, "megakernel: tensor '", name, "' is on ", t.device(),
                ", the others on ", device_);
    return reinterpret_cast<T*>(t.data_ptr());
  }
  // A peer's tensor: on its own device.
  template <typename T>
  T* peer(py::dict& p, int rank, const char* name, torch::ScalarType dtype) {
    return reinterpret_cast<T*>(
        checked(p, "peer " + std::to_string(rank) + " tensor", name, dtype).data_ptr());
  }
  const __nv_bfloat16* bf16(py::dict& tensors, const char* name) {
    return ptr<__nv_bfloat16>(tensors, name, torch::kBFloat16);
  }
  static int size(py::dict& sizes, const char* name) {
    TORCH_CHECK(sizes.contains(name), "megakernel: missing size '", name, "'");
    return sizes[name].cast<int>();
  }

  mk::KernelArgs args_{};
  bool b1_ = false;
  int num_sms_;
  torch::Device device_{torch::kCUDA};
  std::vector<torch::Tensor> keep_;  // the kernel holds raw pointers: keep storage alive
};

void enable_peer_access(int device, int peer) {
  if (device == peer) return;
  int can = 0;
  cudaError_t e = cudaDeviceCanAccessPeer(&can, device, peer);
  TORCH_CHECK(e == cudaSuccess && can, "megakernel: GPU ", device, " cannot access GPU ", peer,
              "'s memory (no peer access: tensor parallelism needs NVLink or PCIe P2P)");
  const c10::cuda::CUDAGuard guard(static_cast<c10::DeviceIndex>(device));
  e = cudaDeviceEnablePeerAccess(peer, 0);
  if (e == cudaErrorPeerAccessAlreadyEnabled) {
    cudaGetLastError();  // clear the sticky-free error
    return;
  }
  TORCH_CHECK(e == cudaSuccess, "megakernel: enabling peer access ", device, " -> ", peer,
              " failed: ", cudaGetErrorString(e));
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "megakernel: the persistent Llama decode interpreter (CUDA, sm_90a)";
  py::class_<Launcher>(m, "Launcher")
      .def(py::init<py::dict, py::dict, int, py::list>(), py::arg("tensors"), py::arg("sizes"),
           py::arg("num_sms"), py::arg("peers") = py::list())
      .def("launch", &Launcher::launch);
  m.def("smem_bytes", &mk::smem_bytes);
  m.def("threads_per_block", &mk::threads_per_block);
  m.def("max_blocks_per_sm", &mk::max_blocks_per_sm);
  m.def("b1_limits", [] {
    py::dict d;
    d["max_batch"] = mk_b1::max_batch();
    d["acc_floats"] = mk_b1::acc_floats();
    d["max_group"] = mk_b1::max_group();
    d["smem_bytes"] = mk_b1::smem_bytes();
    d["max_blocks_per_sm"] = mk_b1::max_blocks_per_sm();
    return d;
  }, "What the batch-1/2 build (csrc/megakernel_b1.cu) takes: the runtime's variant check.");
  m.def("ll_q_compiled",
        [](bool b1) { return b1 ? mk_b1::ll_q_compiled() : mk::ll_q_compiled(); },
        py::arg("b1"), "Whether that build's ATTN takes q and the new k / v from the flagged "
        "pairs QKV writes (MK_LL_Q; q_ll, kv_ll) instead of waiting on QKV's counters.");
  m.def("ll_partials_compiled",
        [](bool b1) {
          return b1 ? mk_b1::ll_partials_compiled() : mk::ll_partials_compiled();
        },
        py::arg("b1"), "Whether that build's ATTN_REDUCE / ATTN_OPROJ take ATTN's partials "
        "from the flagged pairs ATTN writes (MK_LL_PARTIALS; part_ll) instead of waiting on "
        "ATTN's counters.");
  m.def("ll_x_compiled",
        [](bool b1) { return b1 ? mk_b1::ll_x_compiled() : mk::ll_x_compiled(); },
        py::arg("b1"), "Whether that build's QKV (layers >= 1) and LMHEAD take the residual "
        "from the flagged elements DOWN writes (MK_LL_X; x_ll) instead of waiting on DOWN's "
        "counters (tp = 1, batches on CUDA cores).");
  m.def("enable_peer_access", &enable_peer_access, py::arg("device"), py::arg("peer"),
        "Let kernels on `device` access `peer`'s memory (idempotent); raises if impossible.");
}
