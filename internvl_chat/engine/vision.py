"""InternViT: the vision encoder (300M style: LayerNorm + qkv bias; 6B style: RMSNorm + q/k norm).

Module and parameter names follow the original checkpoint layout (SPEC §2), so canonical tensor
names map onto `named_parameters()` one to one.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .config import VisionConfig


class RMSNorm(nn.Module):
    """RMSNorm computed in float32 and cast back, as both reference implementations do."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(dtype)


def make_norm(norm_type: str, dim: int, eps: float) -> nn.Module:
    return nn.LayerNorm(dim, eps=eps) if norm_type == "layer_norm" else RMSNorm(dim, eps)


class VisionEmbeddings(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        dim = cfg.hidden_size
        self.class_embedding = nn.Parameter(torch.zeros(1, 1, dim))
        self.patch_embedding = nn.Conv2d(3, dim, kernel_size=cfg.patch_size, stride=cfg.patch_size)
        self.position_embedding = nn.Parameter(torch.zeros(1, cfg.grid * cfg.grid + 1, dim))

    def _positions(self, grid_h: int, grid_w: int) -> torch.Tensor:
        pos = self.position_embedding
        stored = int(round((pos.shape[1] - 1) ** 0.5))
        if (stored, stored) == (grid_h, grid_w):
            return pos
        # only when the tile grid differs from the trained one: bicubic, as the references do
        cls_pos, patch_pos = pos[:, :1], pos[:, 1:]
        patch_pos = patch_pos.reshape(1, stored, stored, -1).permute(0, 3, 1, 2).float()
        patch_pos = F.interpolate(patch_pos, size=(grid_h, grid_w), mode="bicubic", align_corners=False)
        patch_pos = patch_pos.to(pos.dtype).permute(0, 2, 3, 1).reshape(1, grid_h * grid_w, -1)
        return torch.cat([cls_pos, patch_pos], dim=1)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        patches = self.patch_embedding(pixel_values.to(self.patch_embedding.weight.dtype))
        n, _, gh, gw = patches.shape
        patches = patches.flatten(2).transpose(1, 2)
        cls = self.class_embedding.expand(n, -1, -1)
        return torch.cat([cls, patches], dim=1) + self._positions(gh, gw)


class VisionAttention(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        dim = cfg.hidden_size
        self.num_heads = cfg.num_heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=cfg.qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.qk_norm = cfg.qk_norm
        if cfg.qk_norm:
            # normalised over the full width, not per head (InternViT-6B)
            self.q_norm = RMSNorm(dim, cfg.norm_eps)
            self.k_norm = RMSNorm(dim, cfg.norm_eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, length, dim = x.shape
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        if self.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        heads = lambda t: t.view(n, length, self.num_heads, -1).transpose(1, 2)  # noqa: E731
        out = F.scaled_dot_product_attention(heads(q), heads(k), heads(v))
        return self.proj(out.transpose(1, 2).reshape(n, length, dim))


class VisionMLP(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.fc1 = nn.Linear(cfg.hidden_size, cfg.intermediate_size)
        self.fc2 = nn.Linear(cfg.intermediate_size, cfg.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class VisionLayer(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.norm1 = make_norm(cfg.norm_type, cfg.hidden_size, cfg.norm_eps)
        self.attn = VisionAttention(cfg)
        self.ls1 = nn.Parameter(torch.ones(cfg.hidden_size))
        self.norm2 = make_norm(cfg.norm_type, cfg.hidden_size, cfg.norm_eps)
        self.mlp = VisionMLP(cfg)
        self.ls2 = nn.Parameter(torch.ones(cfg.hidden_size))

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        h = h + self.ls1 * self.attn(self.norm1(h))
        return h + self.ls2 * self.mlp(self.norm2(h))


class VisionEncoder(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.layers = nn.ModuleList(VisionLayer(cfg) for _ in range(cfg.num_layers))


class InternViT(nn.Module):
    """pixel_values [n, 3, S, S] → last hidden state [n, 1 + grid², C] (CLS first, no final norm)."""

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.embeddings = VisionEmbeddings(cfg)
        self.encoder = VisionEncoder(cfg)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        h = self.embeddings(pixel_values)
        for layer in self.encoder.layers:
            h = layer(h)
        return h


def pixel_shuffle(features: torch.Tensor) -> torch.Tensor:
    """Pixel shuffle v2 at ratio 0.5: [n, g², C] (CLS dropped) → [n, (g/2)², 4C].

    out[r, c, i·2C + j·C + ch] = in[2r + i, 2c + j, ch]  (SPEC §1).
    """
    n, length, channels = features.shape
    g = int(round(length**0.5))
    x = features.view(n, g // 2, 2, g // 2, 2, channels)  # [n, r, i, c, j, ch]
    return x.permute(0, 1, 3, 2, 4, 5).reshape(n, (g // 2) ** 2, 4 * channels)


class Projector(nn.Sequential):
    """`mlp1`: LayerNorm(4C, eps 1e-5) → Linear → GELU → Linear, indices 0/1/3 as in checkpoints."""

    def __init__(self, in_dim: int, out_dim: int):
        super().__init__(nn.LayerNorm(in_dim, eps=1e-5), nn.Linear(in_dim, out_dim), nn.GELU(), nn.Linear(out_dim, out_dim))
