"""ReferenceModel: bad input fails before anything is written, bf16 tracks the fp32 oracle,
reset and generate behave, and the capture-safe forward() equals step()."""
import pytest
import torch

from megakernel import KVCache, ModelConfig, ReferenceModel, Weights

TINY = ModelConfig.preset("tiny")


@pytest.fixture(scope="module")
def weights():
    return Weights.random(TINY, seed=0)


def test_bad_tokens_raise_and_write_nothing(weights):
    ref = ReferenceModel(TINY, weights, batch=2, max_seq=8)
    cases = [
        (torch.tensor([1, TINY.V]), "outside the vocabulary"),
        (torch.tensor([-1, 0]), "outside the vocabulary"),
        (torch.tensor([1, 2, 3]), r"shape \[2\]"),
        (torch.tensor([[1, 2]]), r"shape \[2\]"),
        (torch.tensor([1, 2], dtype=torch.int32), "int64"),
        ([1, 2], "int64 tensor"),
    ]
    for tokens, message in cases:
        with pytest.raises(ValueError, match=message):
            ref.step(tokens)
    assert ref.pos == 0 and not ref.cache.k.any()


def test_stepping_past_max_seq_raises(weights):
    ref = ReferenceModel(TINY, weights, batch=1, max_seq=3)
    for _ in range(3):
        ref.step(torch.tensor([5]))
    with pytest.raises(ValueError, match="larger max_seq"):
        ref.step(torch.tensor([5]))
    assert ref.pos == 3
    with pytest.raises(ValueError, match="raise max_seq"):
        ref.generate(torch.zeros(1, 3, dtype=torch.int64), max_new_tokens=2)


@pytest.mark.parametrize("kwargs, message", [
    (dict(batch=0), "batch must be a positive int"),
    (dict(max_seq=2.5), "max_seq must be a positive int"),
    (dict(max_seq=10 ** 6), "max_position_embeddings"),
])
def test_bad_construction_raises(weights, kwargs, message):
    with pytest.raises(ValueError, match=message):
        ReferenceModel(TINY, weights, **kwargs)


def test_weights_of_another_config_raise(weights):
    with pytest.raises(ValueError, match="expected"):
        ReferenceModel(TINY.replace(intermediate_size=256), weights)


def test_kv_cache_write_past_max_seq_raises():
    cache = KVCache(TINY, batch=1, max_seq=4, dtype=torch.float32)
    assert cache.k.shape == (TINY.L, 1, TINY.Hkv, 4, TINY.D)
    kv = torch.ones(1, TINY.Hkv, TINY.D)
    cache.write(0, 3, kv, kv)
    assert cache.k[0, 0, :, 3].eq(1).all() and cache.k.sum() == TINY.Hkv * TINY.D
    with pytest.raises(ValueError, match="raise max_seq"):
        cache.write(0, 4, kv, kv)


def test_bf16_tracks_fp32_and_reset_repeats(weights):
    bf16 = ReferenceModel(TINY, weights, batch=2, max_seq=48)
    fp32 = ReferenceModel(TINY, weights, batch=2, max_seq=48, dtype=torch.float32)
    tokens = torch.randint(0, TINY.V, (2, 40), generator=torch.Generator().manual_seed(0))
    first = []
    for t in range(40):
        lo, hi = bf16.step(tokens[:, t]), fp32.step(tokens[:, t])
        assert lo.dtype == hi.dtype == torch.float32 and lo.shape == (2, TINY.V)
        assert (lo - hi).abs().max() / hi.abs().max() < 0.03
        first.append(hi)
    assert fp32.pos == 40
    fp32.reset()
    assert fp32.pos == 0
    for t in range(5):
        assert torch.equal(fp32.step(tokens[:, t]), first[t])


def test_generate_is_greedy(weights):
    ref = ReferenceModel(TINY, weights, batch=2, max_seq=16, dtype=torch.float32)
    prompt = torch.tensor([[1, 2, 3], [4, 5, 6]])
    out = ref.generate(prompt, max_new_tokens=4)
    assert out.shape == (2, 7) and torch.equal(out[:, :3], prompt)
    ref.reset()
    for t in range(6):
        logits = ref.step(out[:, t])
        if t >= 2:
            assert torch.equal(logits.argmax(-1), out[:, t + 1])


def test_forward_over_full_cache_matches_step(weights):
    # forward() with kv_len None reads all max_seq positions under a mask: the graph path.
    a = ReferenceModel(TINY, weights, batch=1, max_seq=12, dtype=torch.float32)
    b = ReferenceModel(TINY, weights, batch=1, max_seq=12, dtype=torch.float32)
    for p, tok in enumerate([7, 8, 9, 10]):
        want = a.step(torch.tensor([tok]))
        got = b.forward(torch.tensor([tok]), torch.tensor([p]))
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
