"""ModelConfig: the shape of a Llama-family decoder, checked on construction. Torch-free.

Dimension vocabulary used everywhere: B batch, d hidden, I intermediate, L layers,
H query heads, Hkv key/value heads, G = H // Hkv, D head dim, V vocab, S sequence.
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Optional


@dataclasses.dataclass(frozen=True)
class RopeScaling:
    """Llama-3 frequency scaling ("rope_type": "llama3" in Hugging Face configs)."""
    factor: float = 8.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192

    def __post_init__(self):
        if self.factor < 1 or self.low_freq_factor <= 0:
            raise ValueError(f"rope scaling: factor {self.factor} must be >= 1 and "
                             f"low_freq_factor {self.low_freq_factor} > 0")
        if self.high_freq_factor <= self.low_freq_factor:
            raise ValueError(f"rope scaling: high_freq_factor {self.high_freq_factor} must "
                             f"exceed low_freq_factor {self.low_freq_factor}")
        if self.original_max_position_embeddings < 1:
            raise ValueError("rope scaling: original_max_position_embeddings must be >= 1")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    name: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: Optional[int] = None          # default hidden_size // num_heads
    rms_norm_eps: float = 1e-5
    rope_theta: float = 500000.0
    rope_scaling: Optional[RopeScaling] = None
    tie_word_embeddings: bool = False
    max_position_embeddings: int = 131072

    def __post_init__(self):
        for f in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads",
                  "num_kv_heads"):
            v = getattr(self, f)
            if not isinstance(v, int) or v <= 0:
                raise ValueError(f"ModelConfig {self.name!r}: {f} must be a positive int, got {v!r}")
        if self.head_dim is None:
            if self.hidden_size % self.num_heads:
                raise ValueError(
                    f"ModelConfig {self.name!r}: num_heads {self.num_heads} does not divide "
                    f"hidden_size {self.hidden_size}; change one or give head_dim explicitly")
            object.__setattr__(self, "head_dim", self.hidden_size // self.num_heads)
        if self.head_dim <= 0 or self.head_dim % 2:
            raise ValueError(f"ModelConfig {self.name!r}: head_dim {self.head_dim} must be even "
                             "and positive (RoPE rotates pairs)")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"ModelConfig {self.name!r}: num_kv_heads {self.num_kv_heads} must "
                             f"divide num_heads {self.num_heads}")
        if self.rms_norm_eps <= 0 or self.rope_theta <= 0:
            raise ValueError(f"ModelConfig {self.name!r}: rms_norm_eps and rope_theta must be > 0")
        if isinstance(self.rope_scaling, dict):
            object.__setattr__(self, "rope_scaling", RopeScaling(**self.rope_scaling))

    # Short names, the vocabulary of the kernels.
    @property
    def d(self) -> int: return self.hidden_size
    @property
    def I(self) -> int: return self.intermediate_size  # noqa: E743
    @property
    def L(self) -> int: return self.num_layers
    @property
    def H(self) -> int: return self.num_heads
    @property
    def Hkv(self) -> int: return self.num_kv_heads
    @property
    def G(self) -> int: return self.num_heads // self.num_kv_heads
    @property
    def D(self) -> int: return self.head_dim
    @property
    def V(self) -> int: return self.vocab_size

    def num_params(self) -> int:
        d, I, L, V, H, Hkv, D = self.d, self.I, self.L, self.V, self.H, self.Hkv, self.D
        per_layer = d * (H + 2 * Hkv) * D + H * D * d + 3 * d * I + 2 * d
        return L * per_layer + V * d * (1 if self.tie_word_embeddings else 2) + d

    def weight_bytes(self, bytes_per_param: int = 2) -> int:
        """Bytes a decode step streams: every weight once (the embedding only B rows)."""
        d, V = self.d, self.V
        return (self.num_params() - (0 if self.tie_word_embeddings else V * d)) * bytes_per_param

    def replace(self, **changes) -> "ModelConfig":
        return dataclasses.replace(self, **changes)

    @classmethod
    def preset(cls, name: str) -> "ModelConfig":
        try:
            return PRESETS[name]
        except KeyError:
            raise ValueError(f"unknown preset {name!r}; presets: {sorted(PRESETS)}") from None

    @classmethod
    def from_hf(cls, path) -> "ModelConfig":
        """Read a Hugging Face Llama-family config.json (a directory or the file itself)."""
        path = Path(path)
        if path.is_dir():
            path = path / "config.json"
        if not path.is_file():
            raise ValueError(f"no config.json at {path}")
        c = json.loads(path.read_text())
        if c.get("model_type", "llama") != "llama":
            raise ValueError(f"{path}: model_type {c.get('model_type')!r} is not 'llama'")
        for key in ("hidden_act",):
            if c.get(key, "silu") != "silu":
                raise ValueError(f"{path}: {key} {c[key]!r} is not supported (silu only)")
        if c.get("attention_bias") or c.get("mlp_bias"):
            raise ValueError(f"{path}: attention/mlp biases are not supported")
        # transformers 4 writes "rope_scaling"; transformers 5 writes "rope_parameters".
        rs = c.get("rope_scaling") or c.get("rope_parameters") or {}
        kind = rs.get("rope_type", rs.get("type", "default"))
        scaling = None
        if kind != "default":
            if kind != "llama3":
                raise ValueError(f"{path}: rope scaling type {kind!r} is not supported "
                                 "(llama3 or none)")
            scaling = RopeScaling(float(rs["factor"]), float(rs["low_freq_factor"]),
                                  float(rs["high_freq_factor"]),
                                  int(rs["original_max_position_embeddings"]))
        theta = c.get("rope_theta", (c.get("rope_parameters") or {}).get("rope_theta", 10000.0))
        return cls(
            name=path.parent.name or "hf",
            vocab_size=c["vocab_size"], hidden_size=c["hidden_size"],
            intermediate_size=c["intermediate_size"], num_layers=c["num_hidden_layers"],
            num_heads=c["num_attention_heads"],
            num_kv_heads=c.get("num_key_value_heads") or c["num_attention_heads"],
            head_dim=c.get("head_dim"), rms_norm_eps=c.get("rms_norm_eps", 1e-6),
            rope_theta=float(theta), rope_scaling=scaling,
            tie_word_embeddings=bool(c.get("tie_word_embeddings", False)),
            max_position_embeddings=c.get("max_position_embeddings", 131072))


_LLAMA3 = dict(rms_norm_eps=1e-5, rope_theta=500000.0, max_position_embeddings=131072)

PRESETS = {
    "llama-3.2-1b": ModelConfig(
        "llama-3.2-1b", vocab_size=128256, hidden_size=2048, intermediate_size=8192,
        num_layers=16, num_heads=32, num_kv_heads=8, head_dim=64, tie_word_embeddings=True,
        rope_scaling=RopeScaling(32.0, 1.0, 4.0, 8192), **_LLAMA3),
    "llama-3.1-8b": ModelConfig(
        "llama-3.1-8b", vocab_size=128256, hidden_size=4096, intermediate_size=14336,
        num_layers=32, num_heads=32, num_kv_heads=8, head_dim=128,
        rope_scaling=RopeScaling(8.0, 1.0, 4.0, 8192), **_LLAMA3),
    "llama-3.1-70b": ModelConfig(
        "llama-3.1-70b", vocab_size=128256, hidden_size=8192, intermediate_size=28672,
        num_layers=80, num_heads=64, num_kv_heads=8, head_dim=128,
        rope_scaling=RopeScaling(8.0, 1.0, 4.0, 8192), **_LLAMA3),
    # Small enough for CPU tests, with GQA (G = 2) and Llama-3 rope scaling.
    "tiny": ModelConfig(
        "tiny", vocab_size=512, hidden_size=128, intermediate_size=320, num_layers=2,
        num_heads=4, num_kv_heads=2, head_dim=32, tie_word_embeddings=False,
        rope_scaling=RopeScaling(8.0, 1.0, 4.0, 64), rms_norm_eps=1e-5, rope_theta=10000.0,
        max_position_embeddings=4096),
}
