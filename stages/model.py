"""The GPT of the challenge's records, in one file: config, layers, forward, loss.

Features follow the official baseline: tied embeddings, grouped-query attention with RMS-normed q/k,
rotary embeddings (optionally on part of each head), a learned per-head query gain, relu^2 MLP with a
width multiplier, per-channel residual scales, a learned mix with the input embedding, U-Net style
skip connections between the first and second half of the layers, and a tanh logit softcap.
This module is also shipped with the artifact, so it must stay self-contained (torch only).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn


@dataclass(frozen=True)
class ModelConfig:
    vocab_size: int = 1024      # must match the tokenizer; 0 = take it from the dataset
    num_layers: int = 9
    model_dim: int = 512
    num_heads: int = 8
    num_kv_heads: int = 4       # grouped-query attention: heads share K/V in groups
    mlp_mult: float = 2.0       # MLP hidden width = mlp_mult * model_dim
    mlp_activation: str = "relu2"  # relu2 | leaky_relu2 (leaky slope 0.5, then squared)
    rope_base: float = 10000.0
    rope_dims: int = 0          # rotary dims per head (0 = the whole head); records use 16 of 64
    qk_gain_init: float = 1.5   # initial per-head query gain
    logit_softcap: float = 30.0  # 0 disables
    tied_embed_init_std: float = 0.005
    unet_skips: bool = True

    def __post_init__(self):
        if self.model_dim % self.num_heads:
            raise ValueError(f"model_dim {self.model_dim} is not divisible by num_heads {self.num_heads}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads {self.num_heads} is not a multiple of num_kv_heads {self.num_kv_heads}")
        head_dim = self.model_dim // self.num_heads
        if head_dim % 2 or self.rope_dims % 2 or self.rope_dims > head_dim:
            raise ValueError(f"rope_dims {self.rope_dims} must be even and at most the head dim {head_dim}")
        if self.mlp_activation not in ("relu2", "leaky_relu2"):
            raise ValueError(f"mlp_activation must be relu2 or leaky_relu2, not {self.mlp_activation!r}")


def rms_norm(x: Tensor) -> Tensor:
    return F.rms_norm(x, (x.size(-1),))


class Linear(nn.Linear):
    """A bias-free linear layer whose fp32 weights are cast to the activations' dtype at use."""

    def __init__(self, fan_in: int, fan_out: int, zero_init: bool = False):
        super().__init__(fan_in, fan_out, bias=False)
        if zero_init:
            nn.init.zeros_(self.weight)

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self.weight.to(x.dtype))


class Rotary(nn.Module):
    def __init__(self, head_dim: int, rope_dims: int, base: float):
        super().__init__()
        self.dims = rope_dims or head_dim
        inv_freq = 1.0 / base ** (torch.arange(0, self.dims, 2, dtype=torch.float32) / self.dims)
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        """Rotate the first ``dims`` channels of x (B, H, T, D); leave the rest as they are."""
        T = x.size(-2)
        t = torch.arange(T, device=x.device, dtype=torch.float32)
        freqs = torch.outer(t, self.inv_freq)
        cos, sin = freqs.cos().to(x.dtype), freqs.sin().to(x.dtype)
        rot, rest = x[..., : self.dims], x[..., self.dims:]
        a, b = rot[..., : self.dims // 2], rot[..., self.dims // 2:]
        rotated = torch.cat([a * cos + b * sin, b * cos - a * sin], dim=-1)
        return torch.cat([rotated, rest], dim=-1) if rest.numel() else rotated


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.h, self.kv = cfg.num_heads, cfg.num_kv_heads
        self.d = cfg.model_dim // cfg.num_heads
        self.q = Linear(cfg.model_dim, self.h * self.d)
        self.k = Linear(cfg.model_dim, self.kv * self.d)
        self.v = Linear(cfg.model_dim, self.kv * self.d)
        self.out = Linear(self.h * self.d, cfg.model_dim, zero_init=True)
        self.q_gain = nn.Parameter(torch.full((self.h,), cfg.qk_gain_init))
        self.rotary = Rotary(self.d, cfg.rope_dims, cfg.rope_base)

    def forward(self, x: Tensor, attn_mask: Tensor | None = None) -> Tensor:
        B, T, _ = x.shape
        q = self.q(x).view(B, T, self.h, self.d).transpose(1, 2)
        k = self.k(x).view(B, T, self.kv, self.d).transpose(1, 2)
        v = self.v(x).view(B, T, self.kv, self.d).transpose(1, 2)
        q, k = self.rotary(rms_norm(q)), self.rotary(rms_norm(k))
        q = q * self.q_gain.to(q.dtype)[None, :, None, None]
        if attn_mask is None:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=self.kv != self.h)
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, enable_gqa=self.kv != self.h)
        return self.out(y.transpose(1, 2).reshape(B, T, self.h * self.d))


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        hidden = int(cfg.mlp_mult * cfg.model_dim)
        self.fc = Linear(cfg.model_dim, hidden)
        self.proj = Linear(hidden, cfg.model_dim, zero_init=True)
        self.leaky = cfg.mlp_activation == "leaky_relu2"

    def forward(self, x: Tensor) -> Tensor:
        h = self.fc(x)
        h = F.leaky_relu(h, 0.5) if self.leaky else F.relu(h)
        return self.proj(h.square())


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.attn = Attention(cfg)
        self.mlp = MLP(cfg)
        self.attn_scale = nn.Parameter(torch.ones(cfg.model_dim))
        self.mlp_scale = nn.Parameter(torch.ones(cfg.model_dim))
        # learned mix of the running residual with the input embedding x0
        self.resid_mix = nn.Parameter(torch.stack([torch.ones(cfg.model_dim), torch.zeros(cfg.model_dim)]))

    def forward(self, x: Tensor, x0: Tensor, attn_mask: Tensor | None = None) -> Tensor:
        mix = self.resid_mix.to(x.dtype)
        x = mix[0] * x + mix[1] * x0
        x = x + self.attn_scale.to(x.dtype) * self.attn(rms_norm(x), attn_mask)
        return x + self.mlp_scale.to(x.dtype) * self.mlp(rms_norm(x))


class GPT(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        if cfg.vocab_size <= 0:
            raise ValueError("ModelConfig.vocab_size must be set before building the model")
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.model_dim)
        nn.init.normal_(self.embed.weight, std=cfg.tied_embed_init_std)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.num_layers))
        self.n_encoder = cfg.num_layers // 2 if cfg.unet_skips else 0
        n_skips = min(self.n_encoder, cfg.num_layers - self.n_encoder)
        self.skip_weights = nn.Parameter(torch.ones(n_skips, cfg.model_dim))

    def hidden(self, idx: Tensor, attn_mask: Tensor | None = None) -> Tensor:
        x = self.embed(idx)
        if x.is_cuda and torch.is_autocast_enabled("cuda"):
            # the residual stream lives in the autocast dtype (bf16), as in the records: half the bytes
            x = x.to(torch.get_autocast_dtype("cuda"))
        x = rms_norm(x)
        x0 = x
        skips = []
        for i, block in enumerate(self.blocks):
            if i < self.n_encoder:
                x = block(x, x0, attn_mask)
                skips.append(x)
                continue
            j = i - self.n_encoder
            if j < len(self.skip_weights) and skips:
                x = x + self.skip_weights[j].to(x.dtype) * skips.pop()
            x = block(x, x0, attn_mask)
        return rms_norm(x)

    def logits(self, idx: Tensor, attn_mask: Tensor | None = None) -> Tensor:
        h = self.hidden(idx, attn_mask)
        logits = F.linear(h, self.embed.weight.to(h.dtype)).float()
        cap = self.cfg.logit_softcap
        return cap * torch.tanh(logits / cap) if cap > 0 else logits

    def forward(self, idx: Tensor, targets: Tensor) -> Tensor:
        """Mean cross-entropy (nats) of predicting ``targets`` from ``idx``, both (B, T)."""
        assert idx.shape == targets.shape, (idx.shape, targets.shape)
        logits = self.logits(idx)
        return F.cross_entropy(logits.view(-1, logits.size(-1)), targets.reshape(-1))

    def token_nll(self, idx: Tensor, targets: Tensor, attn_mask: Tensor | None = None) -> Tensor:
        """Per-token negative log-likelihood in nats, shape (B, T); the softmax is taken in float64 so
        that sums over millions of tokens are exact to ~1e-12 relative."""
        logits = self.logits(idx, attn_mask).double()
        return F.cross_entropy(logits.view(-1, logits.size(-1)), targets.reshape(-1),
                               reduction="none").view(targets.shape)

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())


def flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    """Training FLOPs per token: 6 x matrix parameters + attention scores (forward + backward)."""
    d, L = cfg.model_dim, cfg.num_layers
    kv_dim = d // cfg.num_heads * cfg.num_kv_heads
    per_layer = d * d * 2 + d * kv_dim * 2 + 2 * d * int(cfg.mlp_mult * d)
    matrix = L * per_layer + cfg.vocab_size * d
    attn = L * 2 * seq_len * d  # causal: half of the 4*T*d of QK^T and AV
    return 6 * matrix + 3 * attn
