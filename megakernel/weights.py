"""Weights: a Llama model's tensors in Hugging Face orientation ([out, in]), random or loaded.

Owns the one mapping from Hugging Face tensor names to fields, the expected shape of every
tensor, and the random initialisation every test and benchmark uses. Invariant: when
cfg.tie_word_embeddings, `lm_head` IS `embed` (the same tensor object), through every `.to()`.

Random scales (chosen so a random model behaves like a trained one numerically):
    wq, wk, wv, w_gate, w_up  ~ N(0, 1/fan_in)            -> outputs of std ~1 from normed input
    wo, w_down                ~ N(0, 1/fan_in) / sqrt(2L)  -> the residual stream grows to ~1 over
                                                             2L additions, as in GPT-2 init
    attention scores q.k/sqrt(D) then have std ~1: softmax is far from uniform, never one-hot.
    embed                     ~ N(0, 1) untied; tied it is also the head, so N(0, 9/d)
    lm_head (untied)          ~ N(0, 9/d)                  -> logits of std ~3
    norm weights              1 + N(0, 0.1^2)              -> never zero, not all equal
"""
from __future__ import annotations

import dataclasses
import json
import math
import sys
import time
from pathlib import Path
from typing import Optional

import torch

from .config import ModelConfig
from .profiling import nvtx_range

LOGIT_STD = 3.0
NORM_NOISE = 0.1
_LAYER_FIELDS = ("attn_norm", "wq", "wk", "wv", "wo", "mlp_norm", "w_gate", "w_up", "w_down")
_HF_LAYER_NAMES = {
    "attn_norm": "input_layernorm.weight", "wq": "self_attn.q_proj.weight",
    "wk": "self_attn.k_proj.weight", "wv": "self_attn.v_proj.weight",
    "wo": "self_attn.o_proj.weight", "mlp_norm": "post_attention_layernorm.weight",
    "w_gate": "mlp.gate_proj.weight", "w_up": "mlp.up_proj.weight",
    "w_down": "mlp.down_proj.weight",
}


def layer_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Field name -> expected shape of one layer's tensors."""
    d, I, H, Hkv, D = cfg.d, cfg.I, cfg.H, cfg.Hkv, cfg.D
    return {"attn_norm": (d,), "wq": (H * D, d), "wk": (Hkv * D, d), "wv": (Hkv * D, d),
            "wo": (d, H * D), "mlp_norm": (d,), "w_gate": (I, d), "w_up": (I, d),
            "w_down": (d, I)}


def hf_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Hugging Face tensor name -> expected shape, for every tensor a checkpoint must hold."""
    shapes = {"model.embed_tokens.weight": (cfg.V, cfg.d), "model.norm.weight": (cfg.d,)}
    per_layer = layer_shapes(cfg)
    for i in range(cfg.L):
        for field, hf in _HF_LAYER_NAMES.items():
            shapes[f"model.layers.{i}.{hf}"] = per_layer[field]
    if not cfg.tie_word_embeddings:
        shapes["lm_head.weight"] = (cfg.V, cfg.d)
    return shapes


@dataclasses.dataclass
class LayerWeights:
    attn_norm: torch.Tensor  # [d]
    wq: torch.Tensor         # [H*D, d]
    wk: torch.Tensor         # [Hkv*D, d]
    wv: torch.Tensor         # [Hkv*D, d]
    wo: torch.Tensor         # [d, H*D]
    mlp_norm: torch.Tensor   # [d]
    w_gate: torch.Tensor     # [I, d]
    w_up: torch.Tensor       # [I, d]
    w_down: torch.Tensor     # [d, I]

    def tensors(self) -> list[torch.Tensor]:
        return [getattr(self, f) for f in _LAYER_FIELDS]


@dataclasses.dataclass
class Weights:
    config: ModelConfig
    embed: torch.Tensor       # [V, d]
    final_norm: torch.Tensor  # [d]
    lm_head: torch.Tensor     # [V, d]; the same object as embed when tied
    layers: list[LayerWeights]

    def __post_init__(self):
        self.check(self.config)

    def check(self, cfg: ModelConfig) -> None:
        """Raise ValueError unless every tensor has the shape `cfg` asks for."""
        def expect(what, t, shape):
            if tuple(t.shape) != tuple(shape):
                raise ValueError(f"weights for {cfg.name!r}: {what} has shape {tuple(t.shape)}, "
                                 f"expected {tuple(shape)}")
        if len(self.layers) != cfg.L:
            raise ValueError(f"weights for {cfg.name!r}: {len(self.layers)} layers, config has "
                             f"{cfg.L}")
        expect("embed", self.embed, (cfg.V, cfg.d))
        expect("lm_head", self.lm_head, (cfg.V, cfg.d))
        expect("final_norm", self.final_norm, (cfg.d,))
        for i, lw in enumerate(self.layers):
            for field, shape in layer_shapes(cfg).items():
                expect(f"layers[{i}].{field}", getattr(lw, field), shape)
        if cfg.tie_word_embeddings and self.lm_head is not self.embed:
            raise ValueError(f"weights for {cfg.name!r}: config ties the embeddings but lm_head "
                             "is not the embedding tensor; pass lm_head=embed")

    @property
    def dtype(self) -> torch.dtype:
        return self.embed.dtype

    @property
    def device(self) -> torch.device:
        return self.embed.device

    def tensors(self) -> list[torch.Tensor]:
        """Every distinct tensor (the tied head counted once)."""
        head = [] if self.lm_head is self.embed else [self.lm_head]
        layers = [t for lw in self.layers for t in lw.tensors()]
        return [self.embed, self.final_norm, *head, *layers]

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors())

    def to(self, device=None, dtype=None) -> "Weights":
        """A new Weights on `device` in `dtype` (None keeps each); tied tensors stay tied."""
        def cv(t):
            return t.to(device=device, dtype=dtype)
        embed = cv(self.embed)
        head = embed if self.lm_head is self.embed else cv(self.lm_head)
        layers = [LayerWeights(*(cv(t) for t in lw.tensors())) for lw in self.layers]
        return Weights(self.config, embed, cv(self.final_norm), head, layers)

    @classmethod
    def random(cls, cfg: ModelConfig, seed: int = 0, dtype=torch.bfloat16,
               device="cpu") -> "Weights":
        """Random weights with realistic scales (module docstring), built on `device` tensor by
        tensor, so host memory never holds the model in fp32. Deterministic for (seed, device
        type)."""
        return cls.assemble(cfg, random_tensors(cfg, seed, dtype, device))

    @classmethod
    def assemble(cls, cfg: ModelConfig, items) -> "Weights":
        """Weights from (layer, field, tensor) items as random_tensors yields them (layer None
        for embed, lm_head, final_norm); without an lm_head the head is the embedding."""
        top, layers = {}, [{} for _ in range(cfg.L)]
        for layer, field, t in items:
            (top if layer is None else layers[layer])[field] = t
        return cls(cfg, top["embed"], top["final_norm"], top.get("lm_head", top["embed"]),
                   [LayerWeights(**fields) for fields in layers])

    @classmethod
    @nvtx_range("megakernel.load")
    def load(cls, hf_dir, device="cpu", dtype: Optional[torch.dtype] = None) -> "Weights":
        """Load a Hugging Face Llama checkpoint (config.json + safetensors, one file or sharded
        with model.safetensors.index.json). dtype None keeps the checkpoint's (the embedding's)
        dtype. Every name and shape is checked before any tensor is read."""
        from safetensors import safe_open

        hf_dir = Path(hf_dir)
        cfg = ModelConfig.from_hf(hf_dir)
        files = _shard_files(hf_dir)
        handles = {f: safe_open(str(f), framework="pt", device="cpu") for f in files}
        where = {name: f for f, h in handles.items() for name in h.keys()}
        expected = hf_shapes(cfg)
        for name, shape in expected.items():
            if name not in where:
                raise ValueError(f"{hf_dir}: checkpoint has no tensor {name!r} (expected shape "
                                 f"{shape}) for config {cfg.name!r}")
            got = tuple(handles[where[name]].get_slice(name).get_shape())
            if got != shape:
                raise ValueError(f"{hf_dir}: tensor {name!r} has shape {got}, expected {shape} "
                                 f"from config.json")
        embed_name = "model.embed_tokens.weight"
        embed = handles[where[embed_name]].get_tensor(embed_name)
        dtype = dtype or embed.dtype
        embed = embed.to(device=device, dtype=dtype)
        progress = _Progress(f"loading {hf_dir.name}", len(expected))
        progress.tick()

        def get(name):
            t = handles[where[name]].get_tensor(name)
            progress.tick()
            return t.to(device=device, dtype=dtype)

        lm_head = embed
        if not cfg.tie_word_embeddings:
            lm_head = get("lm_head.weight")
        elif "lm_head.weight" in where:
            head = handles[where["lm_head.weight"]].get_tensor("lm_head.weight")
            if tuple(head.shape) != (cfg.V, cfg.d) or not torch.equal(
                    head.to(embed.device, embed.dtype), embed):
                raise ValueError(f"{hf_dir}: config.json ties the embeddings but lm_head.weight "
                                 "differs from model.embed_tokens.weight; set "
                                 "tie_word_embeddings to false")
        layers = [LayerWeights(**{field: get(f"model.layers.{i}.{hf}")
                                  for field, hf in _HF_LAYER_NAMES.items()})
                  for i in range(cfg.L)]
        weights = cls(cfg, embed, get("model.norm.weight"), lm_head, layers)
        progress.done()
        return weights


def _shard_files(hf_dir: Path) -> list[Path]:
    index = hf_dir / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        files = [hf_dir / f for f in sorted(set(weight_map.values()))]
        missing = [str(f) for f in files if not f.is_file()]
        if missing:
            raise ValueError(f"{index} names shard files that do not exist: {missing}")
        return files
    single = hf_dir / "model.safetensors"
    if single.is_file():
        return [single]
    found = sorted(hf_dir.glob("*.safetensors"))
    if not found:
        raise ValueError(f"{hf_dir}: no model.safetensors, no model.safetensors.index.json and "
                         "no *.safetensors file; save the model with safe_serialization=True")
    return found


class _Progress:
    """One stderr line, rewritten in place, for loads that take longer than a second."""

    def __init__(self, what: str, total: int):
        self.what, self.total, self.count = what, total, 0
        self.start = self.last = time.monotonic()
        self.shown = False

    def tick(self):
        self.count += 1
        now = time.monotonic()
        if now - self.start > 1.0 and (now - self.last > 0.25 or self.count == self.total):
            self.last, self.shown = now, True
            sys.stderr.write(f"\r{self.what}: {self.count}/{self.total} tensors, "
                             f"{now - self.start:.1f} s")
            sys.stderr.flush()

    def done(self):
        if self.shown:
            sys.stderr.write("\n")


def random_tensors(cfg: ModelConfig, seed: int = 0, dtype=torch.bfloat16, device="cpu"):
    """Yield (layer, field, tensor) of Weights.random one full tensor at a time, in its one
    generation order (one generator stream): embed, lm_head unless tied, each layer's fields
    in LayerWeights order, final_norm; layer is None outside the layers. A caller that keeps
    only a slice of each (bench/tp_baseline.random_shards) never holds the whole model."""
    device = torch.device(device)
    gen = torch.Generator(device=device)
    gen.manual_seed(seed)

    def normal(shape, std):
        out = torch.empty(shape, dtype=dtype, device=device)
        rows = max(1, (1 << 24) // math.prod(shape[1:]))   # <= 64 MB fp32 in flight
        for r0 in range(0, shape[0], rows):
            chunk = out[r0:r0 + rows]
            chunk.copy_(torch.randn(chunk.shape, generator=gen, device=device) * std)
        return out

    def norm_weight():
        noise = torch.randn(cfg.d, generator=gen, device=device) * NORM_NOISE
        return (1.0 + noise).to(dtype)

    d, I, L = cfg.d, cfg.I, cfg.L
    head_std = LOGIT_STD / math.sqrt(d)
    yield None, "embed", normal((cfg.V, d), head_std if cfg.tie_word_embeddings else 1.0)
    if not cfg.tie_word_embeddings:
        yield None, "lm_head", normal((cfg.V, d), head_std)
    out_scale = 1.0 / math.sqrt(2 * L)
    stds = {"wq": d ** -0.5, "wk": d ** -0.5, "wv": d ** -0.5,
            "wo": (cfg.H * cfg.D) ** -0.5 * out_scale, "w_gate": d ** -0.5, "w_up": d ** -0.5,
            "w_down": I ** -0.5 * out_scale}
    shapes = layer_shapes(cfg)
    for layer in range(L):
        for field in _LAYER_FIELDS:   # yielded unbound: the caller's drop frees it
            yield layer, field, (norm_weight() if field.endswith("norm")
                                 else normal(shapes[field], stds[field]))
    yield None, "final_norm", norm_weight()
