"""Packed weights: the layout the CPU interpreter and the GPU kernel both read.

See scheduler/isa.py for the layout contract. In short, per layer:
    wqkv [Hkv*(G+2)*D, d]  kv-group-major (G q heads, k head, v head), q/k rows pair-interleaved
    wo   [d, H*D]
    wgu  [2I, d]           rows 2j / 2j+1 = gate j / up j
    wdown [d, I]
stacked over layers, plus the embedding, the LM head (the embedding itself when tied) and
the three norm weights. Packing copies QKV and gate/up (they are permuted); the embedding
is shared with the source Weights. add_wo_t adds wo_t [L, H*D, d], the O projection
transposed, which ATTN_OPROJ reads (plan option fuse_oproj): one q head dim's weights for
every output column are one contiguous row.

pack_weights(weights, tp=N, rank=r) packs rank r's shard (isa.py "Tensor parallelism"):
the same layout for the shard config (scheduler.sharding), cut from the source weights
before packing, and lm_head holding vocab rows [vocab0, vocab0 + rows) only.
"""
from __future__ import annotations

import dataclasses

import torch

from .config import ModelConfig
from .scheduler.sharding import shard_config, vocab_rows
from .weights import LayerWeights, Weights


def pair_interleave(D: int) -> torch.Tensor:
    """[D] source dim of each packed row inside a q/k head: row 2p <- p, 2p+1 <- p + D/2."""
    half = D // 2
    idx = torch.empty(D, dtype=torch.long)
    idx[0::2] = torch.arange(half)
    idx[1::2] = torch.arange(half) + half
    return idx


def qkv_row_sources(cfg: ModelConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """For each packed QKV row: (which of q/k/v: 0/1/2, row index inside that matrix)."""
    D, G = cfg.D, cfg.G
    inner = pair_interleave(D)
    which, rows = [], []
    for g in range(cfg.Hkv):
        for h in range(g * G, (g + 1) * G):
            which.append(torch.zeros(D, dtype=torch.long)); rows.append(h * D + inner)
        which.append(torch.ones(D, dtype=torch.long)); rows.append(g * D + inner)
        which.append(torch.full((D,), 2, dtype=torch.long)); rows.append(g * D + torch.arange(D))
    return torch.cat(which), torch.cat(rows)


@dataclasses.dataclass
class PackedWeights:
    config: ModelConfig
    embed: torch.Tensor        # [V, d]
    lm_head: torch.Tensor      # [V, d] (is embed when tied)
    final_norm: torch.Tensor   # [d]
    attn_norm: torch.Tensor    # [L, d]
    mlp_norm: torch.Tensor     # [L, d]
    wqkv: torch.Tensor         # [L, Hkv*(G+2)*D, d]
    wo: torch.Tensor           # [L, d, H*D]
    wgu: torch.Tensor          # [L, 2I, d]
    wdown: torch.Tensor        # [L, d, I]
    vocab0: int = 0            # vocab row of lm_head's row 0 (a tensor-parallel shard's)
    wo_t: torch.Tensor | None = None   # [L, H*D, d] wo transposed (add_wo_t), or none

    @property
    def dtype(self) -> torch.dtype:
        return self.wqkv.dtype

    @property
    def device(self) -> torch.device:
        return self.wqkv.device

    def to(self, device=None, dtype=None) -> "PackedWeights":
        def cv(t):
            return t.to(device=device, dtype=dtype)
        emb = cv(self.embed)
        head = emb if self.lm_head is self.embed else cv(self.lm_head)
        return PackedWeights(self.config, emb, head, cv(self.final_norm), cv(self.attn_norm),
                             cv(self.mlp_norm), cv(self.wqkv), cv(self.wo), cv(self.wgu),
                             cv(self.wdown), self.vocab0,
                             None if self.wo_t is None else cv(self.wo_t))


def add_wo_t(packed: PackedWeights) -> PackedWeights:
    """packed with wo_t, the contiguous transpose of wo that ATTN_OPROJ reads (isa.py)."""
    return dataclasses.replace(packed, wo_t=packed.wo.transpose(1, 2).contiguous())


def shard_tensor(cfg: ModelConfig, tp: int, rank: int, field: str, t: torch.Tensor):
    """Rank `rank`'s view of one layer tensor (`field` a LayerWeights field name): its kv
    groups' rows of wq/wk/wv and columns of wo, its FFN units' rows of w_gate/w_up and
    columns of w_down; the norms whole."""
    scfg, D = shard_config(cfg, tp), cfg.D
    q = slice(rank * scfg.H * D, (rank + 1) * scfg.H * D)
    kv = slice(rank * scfg.Hkv * D, (rank + 1) * scfg.Hkv * D)
    ffn = slice(rank * scfg.I, (rank + 1) * scfg.I)
    rows = {"wq": q, "wk": kv, "wv": kv, "w_gate": ffn, "w_up": ffn}
    cols = {"wo": q, "w_down": ffn}
    if field in rows:
        return t[rows[field]]
    return t[:, cols[field]] if field in cols else t


def shard_weights(weights, tp: int, rank: int) -> Weights:
    """Rank `rank`'s slice of every layer matrix as Weights of the shard config (views);
    embedding, norms and the whole LM head kept."""
    cfg = weights.config
    layers = [LayerWeights(**{f.name: shard_tensor(cfg, tp, rank, f.name, getattr(lw, f.name))
                              for f in dataclasses.fields(lw)})
              for lw in weights.layers]
    return Weights(shard_config(cfg, tp), weights.embed, weights.final_norm, weights.lm_head,
                   layers)


def pack_shard(shard, tp: int, rank: int, dtype=None, device=None,
               release: bool = False) -> PackedWeights:
    """Rank `rank`'s Weights of the shard config (shard_weights, or generated per rank for
    models no single device holds) -> its PackedWeights: the LM head cut to the rank's rows.
    release: as pack_weights."""
    v0, nv = vocab_rows(shard.lm_head.shape[0], tp)[rank]
    packed = pack_weights(shard, dtype, device, release=release)
    head = packed.lm_head[v0:v0 + nv]
    if not packed.config.tie_word_embeddings:   # the full head stays only where tied
        head = head.clone()
    return dataclasses.replace(packed, lm_head=head, vocab0=v0)


def pack_weights(weights, dtype=None, device=None, tp: int = 1, rank: int = 0,
                 release: bool = False) -> PackedWeights:
    """Weights -> PackedWeights (in `dtype` on `device`, default the weights' own); with
    tp > 1 rank `rank`'s shard. release=True drops each layer matrix from `weights` once
    packed, so packing a model that fills the device needs room for its largest stack, not
    a second copy; `weights` is unusable afterwards."""
    if tp > 1:
        if not 0 <= rank < tp:
            raise ValueError(f"rank must be in 0..{tp - 1}, got {rank}")
        return pack_shard(shard_weights(weights, tp, rank), tp, rank, dtype, device)
    cfg: ModelConfig = weights.config
    dtype = dtype or weights.embed.dtype
    device = device or weights.embed.device
    which, rows = qkv_row_sources(cfg)

    def cv(t):
        return t.to(device=device, dtype=dtype)

    L, d, I = cfg.L, cfg.d, cfg.I
    sels = [(which == k).nonzero().squeeze(1) for k in range(3)]
    attn_norm = torch.stack([cv(lw.attn_norm) for lw in weights.layers])
    mlp_norm = torch.stack([cv(lw.mlp_norm) for lw in weights.layers])

    def fill_qkv(out, lw):
        for sel, src in zip(sels, (lw.wq, lw.wk, lw.wv)):
            out[sel.to(device)] = cv(src)[rows[sel].to(device)]

    def fill_gu(out, lw):
        out[0::2] = cv(lw.w_gate)
        out[1::2] = cv(lw.w_up)

    # One stack at a time, each filled layer by layer (no second copy in flight); with
    # release the sources of a stack go as it fills, so the peak is the model plus its
    # largest stack, not two models.
    stacks = []
    for rows_cols, fill, sources in (
            ((len(rows), d), fill_qkv, ("wq", "wk", "wv")),
            ((d, cfg.H * cfg.D), lambda out, lw: out.copy_(cv(lw.wo)), ("wo",)),
            ((2 * I, d), fill_gu, ("w_gate", "w_up")),
            ((d, I), lambda out, lw: out.copy_(cv(lw.w_down)), ("w_down",))):
        out = torch.empty(L, *rows_cols, dtype=dtype, device=device)
        for layer, lw in enumerate(weights.layers):
            fill(out[layer], lw)
            if release:
                for name in sources:
                    setattr(lw, name, None)
        stacks.append(out)
    wqkv, wo, wgu, wdown = stacks
    embed = cv(weights.embed)
    tied = cfg.tie_word_embeddings or weights.lm_head is weights.embed
    return PackedWeights(
        config=cfg, embed=embed, lm_head=embed if tied else cv(weights.lm_head),
        final_norm=cv(weights.final_norm), attn_norm=attn_norm, mlp_norm=mlp_norm,
        wqkv=wqkv, wo=wo, wgu=wgu, wdown=wdown)
