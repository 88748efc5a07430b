"""Real checkpoints: a random transformers LlamaForCausalLM saved with save_pretrained, loaded
through ModelConfig.from_hf + Weights.load; the fp32 ReferenceModel's decode logits must match
transformers' own KV-cached decode (max|diff| / max|ref| <= 1e-4)."""
import pytest
import torch

from megakernel import ModelConfig, ReferenceModel, Weights

transformers = pytest.importorskip("transformers")

STEPS, BATCH, TOL = 20, 2, 1e-4


def _random_hf_model(tied: bool, heads: int, kv_heads: int):
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=256, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
        num_attention_heads=heads, num_key_value_heads=kv_heads, head_dim=16,
        rms_norm_eps=1e-5, rope_theta=10000.0, max_position_embeddings=256,
        initializer_range=0.1, tie_word_embeddings=tied,
        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                      "high_freq_factor": 4.0, "original_max_position_embeddings": 16})
    model = transformers.LlamaForCausalLM._from_config(
        config, attn_implementation="eager", torch_dtype=torch.float32).eval()
    with torch.no_grad():   # norm weights of ones would hide a swapped norm
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1 + 0.2 * torch.randn_like(p))
    return model


@pytest.mark.parametrize("tied, heads, kv_heads, shard", [
    (True, 4, 4, None), (False, 4, 4, None), (True, 8, 2, None), (False, 8, 2, "40KB")])
def test_reference_matches_transformers(tmp_path, tied, heads, kv_heads, shard):
    model = _random_hf_model(tied, heads, kv_heads)
    model.save_pretrained(tmp_path, **({"max_shard_size": shard} if shard else {}))
    if shard:
        assert (tmp_path / "model.safetensors.index.json").is_file()

    cfg = ModelConfig.from_hf(tmp_path)
    assert cfg.rope_scaling is not None and cfg.G == heads // kv_heads and cfg.D == 16
    weights = Weights.load(tmp_path)
    assert (weights.lm_head is weights.embed) == tied
    ref = ReferenceModel(cfg, weights, batch=BATCH, max_seq=64, dtype=torch.float32)

    tokens = torch.randint(0, cfg.V, (BATCH, STEPS), generator=torch.Generator().manual_seed(1))
    cache = transformers.DynamicCache(config=model.config)
    worst = 0.0
    with torch.no_grad():
        for t in range(STEPS):
            out = model(tokens[:, t:t + 1], past_key_values=cache, use_cache=True)
            want = out.logits[:, -1].float()
            got = ref.step(tokens[:, t])
            worst = max(worst, ((got - want).abs().max() / want.abs().max()).item())
    assert worst <= TOL, f"max relative error {worst:.2e} over {STEPS} steps"
