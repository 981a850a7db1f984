"""Qwen-VL's vision tower: an open_clip ViT-bigG/14 geometry (no class token) and a one-layer
cross-attention resampler that turns the patch grid into `n_queries` LLM-width features."""

from __future__ import annotations

import math
from collections import OrderedDict

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

# The ViT's own position table is a fixed 16x16 grid in every Qwen-VL checkpoint.
VIT_POS_ROWS = 256


def resize_pos_table(table: torch.Tensor, n_target: int) -> torch.Tensor:
    """Bicubic resize of a square [L, C] grid table to n_target positions (fp32, align_corners=False)."""
    src, tgt = int(math.isqrt(table.shape[0])), int(math.isqrt(n_target))
    if src == tgt:
        return table
    grid = table.float().reshape(1, src, src, -1).permute(0, 3, 1, 2)
    grid = F.interpolate(grid, size=(tgt, tgt), mode="bicubic", align_corners=False)
    return grid.permute(0, 2, 3, 1).flatten(0, 2).to(table.dtype)


def sincos_pos_embed_2d(dim: int, grid: int) -> torch.Tensor:
    """MAE's 2-D sin-cos table [grid*grid, dim]: first half encodes the column, second the row.
    Computed in numpy float32 exactly like the checkpoints were initialised."""

    def one_axis(d: int, pos: np.ndarray) -> np.ndarray:
        omega = np.arange(d // 2, dtype=np.float32) / (d / 2.0)
        omega = 1.0 / 10000**omega
        out = np.einsum("m,d->md", pos.reshape(-1), omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    axis = np.arange(grid, dtype=np.float32)
    cols, rows = np.meshgrid(axis, axis)  # meshgrid(w, h): first output varies along columns
    emb = np.concatenate([one_axis(dim // 2, cols), one_axis(dim // 2, rows)], axis=1)
    return torch.from_numpy(emb).float()


class VisualAttention(nn.Module):
    """Self-attention whose packed in_proj rows are interleaved per head: [q_h; k_h; v_h] for head h."""

    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.head_dim = width // heads
        self.in_proj = nn.Linear(width, 3 * width)
        self.out_proj = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        qkv = self.in_proj(x).view(b, n, self.heads, 3, self.head_dim)
        q, k, v = qkv.permute(3, 0, 2, 1, 4).unbind(0)  # each [b, heads, n, head_dim]
        out = F.scaled_dot_product_attention(q, k, v)
        return self.out_proj(out.transpose(1, 2).reshape(b, n, -1))


class VisualBlock(nn.Module):
    def __init__(self, width: int, heads: int, mlp_width: int) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(width, eps=1e-6)
        self.attn = VisualAttention(width, heads)
        self.ln_2 = nn.LayerNorm(width, eps=1e-6)
        self.mlp = nn.Sequential(
            OrderedDict(
                c_fc=nn.Linear(width, mlp_width),
                gelu=nn.GELU(),  # exact erf GELU, as open_clip
                c_proj=nn.Linear(mlp_width, width),
            )
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class VisualTransformer(nn.Module):
    def __init__(self, width: int, layers: int, heads: int, mlp_width: int) -> None:
        super().__init__()
        self.resblocks = nn.ModuleList(VisualBlock(width, heads, mlp_width) for _ in range(layers))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.resblocks:
            x = block(x)
        return x


class Resampler(nn.Module):
    """`n_queries` learned queries cross-attend to the patch features (keys carry the sin-cos positions)."""

    def __init__(self, n_queries: int, dim: int, kv_dim: int) -> None:
        super().__init__()
        grid = math.isqrt(n_queries)
        if grid * grid != n_queries:
            raise ValueError(f"visual.n_queries must be a square number, got {n_queries}")
        self.num_heads = dim // 128
        self.pos_embed = nn.Parameter(sincos_pos_embed_2d(dim, grid), requires_grad=False)
        self.query = nn.Parameter(torch.zeros(n_queries, dim))
        self.kv_proj = nn.Linear(kv_dim, dim, bias=False) if kv_dim != dim else nn.Identity()
        self.attn = nn.MultiheadAttention(dim, self.num_heads, batch_first=True)
        self.ln_q = nn.LayerNorm(dim, eps=1e-6)
        self.ln_kv = nn.LayerNorm(dim, eps=1e-6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        kv_pos = resize_pos_table(self.pos_embed, x.shape[1])
        x = self.ln_kv(self.kv_proj(x))
        q = (self.ln_q(self.query) + self.pos_embed).unsqueeze(0).expand(x.shape[0], -1, -1)
        out, _ = self.attn(q, x + kv_pos, x, need_weights=False)
        return out


class VisionTower(nn.Module):
    """Pixels [n, 3, S, S] (already normalised) -> image features [n, n_queries, output_dim]."""

    def __init__(self, visual: dict) -> None:
        super().__init__()
        width, patch = int(visual["width"]), int(visual["patch_size"])
        self.image_size = int(visual["image_size"])
        self.grid = self.image_size // patch
        self.conv1 = nn.Conv2d(3, width, kernel_size=patch, stride=patch, bias=False)
        self.positional_embedding = nn.Parameter(torch.randn(VIT_POS_ROWS, width) * width**-0.5)
        self.ln_pre = nn.LayerNorm(width, eps=1e-6)
        mlp_width = int(width * float(visual["mlp_ratio"]))
        self.transformer = VisualTransformer(width, int(visual["layers"]), int(visual["heads"]), mlp_width)
        out_dim = int(visual["output_dim"])
        self.attn_pool = Resampler(int(visual.get("n_queries", 256)), out_dim, width)
        self.ln_post = nn.LayerNorm(out_dim, eps=1e-6)
        self.proj = nn.Parameter(torch.randn(out_dim, out_dim) * out_dim**-0.5)  # used as x @ proj

    @property
    def dtype(self) -> torch.dtype:
        return self.conv1.weight.dtype

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        x = self.conv1(pixels.to(self.conv1.weight.device, self.dtype))
        x = x.flatten(2).transpose(1, 2)  # [n, grid*grid, width]
        x = x + resize_pos_table(self.positional_embedding, x.shape[1])
        x = self.transformer(self.ln_pre(x))
        x = self.ln_post(self.attn_pool(x))
        return x @ self.proj
