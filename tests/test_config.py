"""ModelConfig: presets are valid, inconsistent configs fail with clear messages, from_hf
reads what Hugging Face writes."""
import json

import pytest

from megakernel import PRESETS, ModelConfig, RopeScaling


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_presets_are_consistent(name):
    cfg = ModelConfig.preset(name)
    assert cfg.H % cfg.Hkv == 0 and cfg.D % 2 == 0 and cfg.G * cfg.Hkv == cfg.H
    assert cfg.num_params() > 0 and cfg.weight_bytes() > 0


def test_published_shapes():
    one_b = ModelConfig.preset("llama-3.2-1b")
    assert (one_b.d, one_b.L, one_b.H, one_b.Hkv, one_b.D, one_b.tie_word_embeddings) == (
        2048, 16, 32, 8, 64, True)
    assert 1.2e9 < one_b.num_params() < 1.3e9
    assert 8.0e9 < ModelConfig.preset("llama-3.1-8b").num_params() < 8.1e9
    assert 70.5e9 < ModelConfig.preset("llama-3.1-70b").num_params() < 70.6e9


def test_unknown_preset_lists_presets():
    with pytest.raises(ValueError, match="tiny"):
        ModelConfig.preset("llama-4")


@pytest.mark.parametrize("changes, message", [
    (dict(num_heads=3, head_dim=None), "does not divide hidden_size"),
    (dict(num_kv_heads=3), "must divide num_heads"),
    (dict(head_dim=33), "must be even"),
    (dict(vocab_size=0), "vocab_size must be a positive int"),
    (dict(rms_norm_eps=0.0), "rms_norm_eps"),
])
def test_inconsistent_config_raises(changes, message):
    with pytest.raises(ValueError, match=message):
        ModelConfig.preset("tiny").replace(**changes)


def test_bad_rope_scaling_raises():
    with pytest.raises(ValueError, match="high_freq_factor"):
        RopeScaling(8.0, 4.0, 1.0, 8192)


def test_config_is_frozen():
    with pytest.raises(Exception):
        ModelConfig.preset("tiny").hidden_size = 1


def test_from_hf_round_trip(tmp_path):
    transformers = pytest.importorskip("transformers")
    hf = transformers.LlamaConfig(
        vocab_size=300, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
        num_attention_heads=8, num_key_value_heads=2, rms_norm_eps=1e-5, rope_theta=50000.0,
        max_position_embeddings=1024, tie_word_embeddings=True,
        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                      "high_freq_factor": 4.0, "original_max_position_embeddings": 256})
    hf.save_pretrained(tmp_path)
    cfg = ModelConfig.from_hf(tmp_path)
    assert (cfg.V, cfg.d, cfg.I, cfg.L, cfg.H, cfg.Hkv, cfg.D) == (300, 64, 96, 3, 8, 2, 8)
    assert cfg.rms_norm_eps == 1e-5 and cfg.rope_theta == 50000.0
    assert cfg.tie_word_embeddings and cfg.max_position_embeddings == 1024
    assert cfg.rope_scaling == RopeScaling(8.0, 1.0, 4.0, 256)


def test_from_hf_rejects_other_models(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "mistral"}))
    with pytest.raises(ValueError, match="not 'llama'"):
        ModelConfig.from_hf(tmp_path)
    with pytest.raises(ValueError, match="no config.json"):
        ModelConfig.from_hf(tmp_path / "nowhere")


def test_from_hf_reads_legacy_rope_scaling(tmp_path):
    # transformers 4.x writes "rope_scaling" and a top-level "rope_theta".
    (tmp_path / "config.json").write_text(json.dumps({
        "model_type": "llama", "vocab_size": 128, "hidden_size": 64, "intermediate_size": 96,
        "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 4,
        "rope_theta": 500000.0, "rope_scaling": {
            "rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}}))
    cfg = ModelConfig.from_hf(tmp_path)
    assert cfg.rope_scaling == RopeScaling(32.0, 1.0, 4.0, 8192)
    assert cfg.rope_theta == 500000.0 and cfg.G == 1 and not cfg.tie_word_embeddings
