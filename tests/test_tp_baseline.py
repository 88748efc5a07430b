"""The tensor-parallel PyTorch baseline (bench/tp_baseline.py) against the single-device
ReferenceModel: random_shards equals shard_weights of Weights.random exactly; with LocalComm
at tp = 2 and 4 the fp32 step equals the fp32 reference within 1e-5 (only the order of the
all-reduce sums differs), over seeded cache positions and several steps; bf16 stays within
2x bf16 eager's error of fp32 (STYLE.md 9); fp32 compute over bf16 weights (the 70B oracle)
equals the fp32 reference of the same weights; bad tp values are named. The `gpu` test runs
NcclComm on two GPUs, eager and CUDA-graph replayed, against LocalComm on the same GPUs."""
import random

import pytest
import torch

import megakernel as mk
from megakernel.bench.harness import seed_cache, seeded_inputs
from megakernel.bench.tp_baseline import LocalComm, NcclComm, TpTorchModel, random_shards
from megakernel.packing import shard_weights

REL_TOL = 1e-5
TINY = mk.ModelConfig.preset("tiny")


def random_config(draw: int) -> mk.ModelConfig:
    """GQA with Hkv divisible by 4, an uneven vocab split, tied or not."""
    rng = random.Random(f"tp-baseline-{draw}")
    Hkv, G = 4 * rng.choice([1, 2]), rng.choice([2, 4])
    return mk.ModelConfig(
        f"rand-tpb{draw}", vocab_size=rng.randrange(101, 300, 2),
        hidden_size=32 * rng.choice([2, 3, 5]), intermediate_size=4 * rng.randrange(5, 40),
        num_layers=2, num_heads=G * Hkv, num_kv_heads=Hkv, head_dim=rng.choice([16, 32]),
        tie_word_embeddings=draw % 2 == 1, rope_theta=rng.choice([10000.0, 500000.0]))


RAND = random_config(0)
CASES = [(TINY, 2), (RAND, 2), (RAND, 4), (random_config(1), 4)]

pytestmark = pytest.mark.usefixtures("one_thread")


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got - want).abs().max() / want.abs().max()).item()


def tp_model(cfg, weights, tp, batch, max_seq, **options):
    shards = [shard_weights(weights, tp, r) for r in range(tp)]
    return TpTorchModel(cfg, shards, LocalComm(), batch=batch, max_seq=max_seq, **options)


def seed(model, k, v) -> None:
    if isinstance(model, TpTorchModel):
        model.seed_cache(k, v)
    else:
        seed_cache(model.cache.k, model.cache.v, k, v)


def run_both(cfg, models, batch=3, seeded=3, steps=4):
    """Seed positions 0..seeded-1 of every model's cache alike (as the bench does), then step
    them from there, alternating the capture-style forward (kv_len None) and step(); -> each
    model's per-step logits. The first model's greedy tokens feed all."""
    tokens, k, v = seeded_inputs(cfg, batch, seeded, "cpu")
    for model in models:
        seed(model, k, v)
        model.pos = seeded
    out = [[] for _ in models]
    for t in range(steps):
        for logits, model in zip(out, models):
            if t % 2:
                logits.append(model.step(tokens))
            else:
                logits.append(model.forward(tokens, torch.tensor([model.pos])))
                model.pos += 1
        tokens = out[0][-1].argmax(-1)
    return out


@pytest.mark.parametrize("cfg, tp", CASES, ids=lambda x: getattr(x, "name", x))
def test_random_shards_equal_shard_weights(cfg, tp):
    full = mk.Weights.random(cfg, seed=5, dtype=torch.bfloat16)
    shards = random_shards(cfg, tp, seed=5, dtype=torch.bfloat16, devices=["cpu"] * tp)
    for r, shard in enumerate(shards):
        want = shard_weights(full, tp, r)
        assert shard.config == want.config
        assert len(shard.tensors()) == len(want.tensors())
        for got_t, want_t in zip(shard.tensors(), want.tensors()):
            assert got_t.dtype == torch.bfloat16 and torch.equal(got_t, want_t)
        assert (shard.lm_head is shard.embed) == cfg.tie_word_embeddings
        for t in shard.layers[0].tensors():   # own copies: no slice pins a whole tensor
            assert t.is_contiguous() and t.untyped_storage().nbytes() == t.nbytes


@pytest.mark.parametrize("cfg, tp", CASES, ids=lambda x: getattr(x, "name", x))
def test_fp32_matches_reference(cfg, tp):
    w = mk.Weights.random(cfg, seed=1, dtype=torch.float32)
    ref = mk.ReferenceModel(cfg, w, batch=3, max_seq=10)
    tpm = tp_model(cfg, w, tp, batch=3, max_seq=10)
    want, got = run_both(cfg, [ref, tpm])
    for step, (a, b) in enumerate(zip(got, want)):
        assert a.dtype == torch.float32 and a.shape == (3, cfg.V)
        assert rel_err(a, b) <= REL_TOL, step
    h = tpm.shard_config.Hkv
    for r, cache in enumerate(tpm.caches):
        torch.testing.assert_close(cache.k, ref.cache.k[:, :, r * h:(r + 1) * h])
        torch.testing.assert_close(cache.v, ref.cache.v[:, :, r * h:(r + 1) * h])


@pytest.mark.parametrize("cfg, tp", CASES[:3], ids=lambda x: getattr(x, "name", x))
def test_bf16_within_bf16_tolerance(cfg, tp):
    w = mk.Weights.random(cfg, seed=2, dtype=torch.bfloat16)
    fp = mk.ReferenceModel(cfg, w, batch=3, max_seq=10, dtype=torch.float32)
    bf = mk.ReferenceModel(cfg, w, batch=3, max_seq=10)
    tpm = tp_model(cfg, w, tp, batch=3, max_seq=10)
    want, ref_bf16, got = run_both(cfg, [fp, bf, tpm])
    for step, (a, b, c) in enumerate(zip(got, ref_bf16, want)):
        assert rel_err(a, c) <= 2 * rel_err(b, c) + 2e-3, step


def test_fp32_compute_over_bf16_weights_is_the_fp32_reference():
    cfg, tp = RAND, 4
    w = mk.Weights.random(cfg, seed=3, dtype=torch.bfloat16)
    fp = mk.ReferenceModel(cfg, w, batch=2, max_seq=8, dtype=torch.float32)
    tpm = tp_model(cfg, w, tp, batch=2, max_seq=8, compute_dtype=torch.float32)
    assert tpm.caches[0].dtype == torch.float32
    want, got = run_both(cfg, [fp, tpm], batch=2, seeded=2, steps=3)
    assert max(rel_err(a, b) for a, b in zip(got, want)) <= REL_TOL
    assert all(t.dtype == torch.bfloat16 for s in tpm.shards for t in s.tensors())


def test_generate_matches_reference():
    w = mk.Weights.random(RAND, seed=4, dtype=torch.float32)
    prompt = torch.randint(0, RAND.V, (2, 3), generator=torch.Generator().manual_seed(4))
    ref = mk.ReferenceModel(RAND, w, batch=2, max_seq=12)
    tpm = tp_model(RAND, w, 4, batch=2, max_seq=12)
    assert torch.equal(tpm.generate(prompt, 8), ref.generate(prompt, 8))
    tpm.reset()
    assert tpm.pos == 0 and not any(c.k.any() for c in tpm.caches)


@pytest.mark.parametrize("tp, what", [(3, "num_kv_heads"), (8, "num_kv_heads")])
def test_bad_tp_is_named(tp, what):
    with pytest.raises(ValueError, match=f"tp={tp} must divide {what}"):
        random_shards(TINY, tp, devices=["cpu"] * tp)
    w = mk.Weights.random(TINY, seed=0)
    with pytest.raises(ValueError, match=f"tp={tp} must divide {what}"):
        TpTorchModel(TINY, [w] * tp, LocalComm())
    with pytest.raises(ValueError, match=r"tp=2 must divide intermediate_size \(321\)"):
        random_shards(TINY.replace(intermediate_size=321), 2, devices=["cpu"] * 2)


def test_bad_shards_and_devices_are_named():
    w = mk.Weights.random(RAND, seed=0, dtype=torch.float32)
    with pytest.raises(ValueError, match="rank 1's shard.*wq has shape"):
        TpTorchModel(RAND, [shard_weights(w, 2, 0), shard_weights(w, 4, 1)], LocalComm())
    with pytest.raises(ValueError, match="3 devices for tp=2"):
        random_shards(RAND, 2, devices=["cpu"] * 3)
    with pytest.raises(ValueError, match="one distinct, indexed CUDA device per rank"):
        NcclComm(["cpu", "cpu"])


def test_capture_needs_nccl_on_cuda_devices():
    tpm = tp_model(TINY, mk.Weights.random(TINY, seed=0), 2, batch=1, max_seq=4)
    with pytest.raises(RuntimeError, match="needs every rank on its own CUDA device and an "
                                           "NcclComm"):
        tpm.capture(torch.tensor([1]), torch.tensor([0]))


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA GPUs for NCCL")
@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
def test_nccl_on_two_gpus_matches_local_eager_and_captured(dtype, tol):
    """NcclComm vs LocalComm on the same two GPUs and shards, eager and captured: the graph
    re-reads tokens and position on every replay."""
    cfg, B, P, S = random_config(0).replace(vocab_size=4099), 2, 5, 16
    devices = ["cuda:0", "cuda:1"]
    shards = random_shards(cfg, 2, seed=0, dtype=dtype, devices=devices)
    nccl = TpTorchModel(cfg, shards, NcclComm(devices), batch=B, max_seq=S)
    local = TpTorchModel(cfg, shards, LocalComm(), batch=B, max_seq=S)
    tokens, k, v = seeded_inputs(cfg, B, P, "cuda:0")
    for m in (nccl, local):
        m.seed_cache(k, v)
    pos_t = torch.tensor([P], device="cuda:0")
    want = local.forward(tokens, pos_t)
    assert rel_err(nccl.forward(tokens, pos_t), want) <= tol
    graph = nccl.capture(tokens, pos_t)
    graph.replay()
    torch.cuda.synchronize("cuda:0")
    assert rel_err(graph.logits, want) <= tol
    tokens.copy_(want.argmax(-1))
    pos_t.fill_(P + 1)
    graph.replay()
    want = local.forward(tokens, pos_t)
    torch.cuda.synchronize("cuda:0")
    assert rel_err(graph.logits, want) <= tol
    for a, b in zip(nccl.caches, local.caches):   # the same (shared-position) writes
        torch.testing.assert_close(a.k, b.k, rtol=tol, atol=tol)
