"""Weights: random init is deterministic with sane scales, ties stay tied, and loading checks
every name and shape of a safetensors checkpoint (single file or sharded)."""
import json

import pytest
import torch
from safetensors.torch import save_file

from megakernel import ModelConfig, Weights
from megakernel.weights import hf_shapes

TINY = ModelConfig.preset("tiny")


def test_random_is_deterministic():
    a, b = Weights.random(TINY, seed=3), Weights.random(TINY, seed=3)
    assert all(torch.equal(x, y) for x, y in zip(a.tensors(), b.tensors()))
    c = Weights.random(TINY, seed=4)
    assert not torch.equal(a.layers[0].wq, c.layers[0].wq)


def test_random_scales_are_sane():
    w = Weights.random(TINY, seed=0, dtype=torch.float32)
    for t in w.tensors():
        assert torch.isfinite(t).all() and (t != 0).float().mean() > 0.99
    lw = w.layers[0]
    assert abs(lw.wq.std().item() * TINY.d ** 0.5 - 1) < 0.1
    assert abs(w.embed.std().item() - 1) < 0.05
    assert (lw.attn_norm - 1).abs().max() < 1 and lw.attn_norm.std() > 0.01
    assert lw.w_down.std() < lw.w_up.std()   # output projections shrunk by 1/sqrt(2L)


def test_tied_is_tied_through_to():
    cfg = TINY.replace(tie_word_embeddings=True)
    w = Weights.random(cfg, seed=0)
    assert w.lm_head is w.embed
    w32 = w.to(dtype=torch.float32)
    assert w32.lm_head is w32.embed and w32.dtype == torch.float32
    assert w.nbytes() == cfg.num_params() * 2
    assert Weights.random(TINY).nbytes() == TINY.num_params() * 2


def test_wrong_shapes_are_named():
    w = Weights.random(TINY, seed=0)
    w.layers[1].wk = w.layers[1].wk[:-1]
    with pytest.raises(ValueError, match=r"layers\[1\]\.wk has shape"):
        w.check(TINY)


def _hf_state(w: Weights) -> dict:
    state = {"model.embed_tokens.weight": w.embed, "model.norm.weight": w.final_norm}
    if w.lm_head is not w.embed:
        state["lm_head.weight"] = w.lm_head
    names = ["input_layernorm", "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj",
             "self_attn.o_proj", "post_attention_layernorm", "mlp.gate_proj", "mlp.up_proj",
             "mlp.down_proj"]
    for i, lw in enumerate(w.layers):
        for name, t in zip(names, lw.tensors()):
            state[f"model.layers.{i}.{name}.weight"] = t
    return {k: v.contiguous() for k, v in state.items()}


def _write_checkpoint(path, cfg, state, shards=1):
    path.mkdir(exist_ok=True)
    (path / "config.json").write_text(json.dumps({
        "model_type": "llama", "vocab_size": cfg.V, "hidden_size": cfg.d,
        "intermediate_size": cfg.I, "num_hidden_layers": cfg.L,
        "num_attention_heads": cfg.H, "num_key_value_heads": cfg.Hkv, "head_dim": cfg.D,
        "rms_norm_eps": cfg.rms_norm_eps, "rope_theta": cfg.rope_theta,
        "tie_word_embeddings": cfg.tie_word_embeddings}))
    if shards == 1:
        save_file(state, str(path / "model.safetensors"))
        return
    names = sorted(state)
    weight_map = {}
    for s in range(shards):
        fname = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
        part = {n: state[n] for n in names[s::shards]}
        save_file(part, str(path / fname))
        weight_map.update({n: fname for n in part})
    (path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))


@pytest.mark.parametrize("tied, shards", [(False, 1), (True, 1), (False, 3)])
def test_load_round_trip(tmp_path, tied, shards):
    cfg = TINY.replace(tie_word_embeddings=tied, rope_scaling=None)
    w = Weights.random(cfg, seed=1, dtype=torch.float32)
    _write_checkpoint(tmp_path / "ckpt", cfg, _hf_state(w), shards=shards)
    loaded = Weights.load(tmp_path / "ckpt")
    assert loaded.dtype == torch.float32 and (loaded.lm_head is loaded.embed) == tied
    assert all(torch.equal(x, y) for x, y in zip(w.tensors(), loaded.tensors()))
    bf16 = Weights.load(tmp_path / "ckpt", dtype=torch.bfloat16)
    assert all(t.dtype == torch.bfloat16 for t in bf16.tensors())


def test_load_missing_tensor_is_named(tmp_path):
    cfg = TINY.replace(rope_scaling=None)
    state = _hf_state(Weights.random(cfg, seed=0))
    del state["model.layers.1.mlp.up_proj.weight"]
    _write_checkpoint(tmp_path, cfg, state)
    with pytest.raises(ValueError, match=r"no tensor 'model\.layers\.1\.mlp\.up_proj\.weight' "
                                         r"\(expected shape \(320, 128\)\)"):
        Weights.load(tmp_path)


def test_load_misshapen_tensor_is_named(tmp_path):
    cfg = TINY.replace(rope_scaling=None)
    state = _hf_state(Weights.random(cfg, seed=0))
    state["model.layers.0.self_attn.k_proj.weight"] = torch.zeros(65, cfg.d)
    _write_checkpoint(tmp_path, cfg, state)
    with pytest.raises(ValueError, match=r"'model\.layers\.0\.self_attn\.k_proj\.weight' has "
                                         r"shape \(65, 128\), expected \(64, 128\)"):
        Weights.load(tmp_path)


def test_load_untied_head_that_differs_from_tied_config(tmp_path):
    cfg = TINY.replace(rope_scaling=None, tie_word_embeddings=True)
    state = _hf_state(Weights.random(cfg, seed=0))
    state["lm_head.weight"] = torch.ones(cfg.V, cfg.d, dtype=torch.bfloat16)
    _write_checkpoint(tmp_path, cfg, state)
    with pytest.raises(ValueError, match="tie_word_embeddings"):
        Weights.load(tmp_path)


def test_load_without_safetensors(tmp_path):
    _write_checkpoint(tmp_path, TINY, {"x": torch.zeros(1)})
    (tmp_path / "model.safetensors").unlink()
    with pytest.raises(ValueError, match="no model.safetensors"):
        Weights.load(tmp_path)


def test_hf_shapes_counts_every_tensor():
    assert len(hf_shapes(TINY)) == 3 + 9 * TINY.L
    assert len(hf_shapes(TINY.replace(tie_word_embeddings=True))) == 2 + 9 * TINY.L
