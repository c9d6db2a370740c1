"""The Diffusion Transformer (Peebles & Xie 2023), numerically the reference's models.py.

Module names equal the official state-dict keys (`x_embedder.proj`, `t_embedder.mlp.0`,
`blocks.N.attn.qkv`, `final_layer.linear`, ...), so official weights load without renames.
A model may hold only a contiguous range of blocks, with or without the embedders (stage
0) and the final layer (last stage): that is a pipeline stage, and its keys are still the
global ones (`blocks.17.*`). Imports torch only.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .configs import DiTConfig


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """adaLN: x (N, T, D) * (1 + scale (N, D)) + shift (N, D)."""
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


def timestep_embedding(t: torch.Tensor, dim: int, max_period: int = 10000) -> torch.Tensor:
    """Sinusoidal embedding (N, dim) of timesteps t (N,), `[cos, sin]` order as the reference."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) *
                      torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t[:, None].float() * freqs[None]
    embedding = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        embedding = torch.cat([embedding, torch.zeros_like(embedding[:, :1])], dim=-1)
    return embedding


def _sincos_1d(dim: int, positions: np.ndarray) -> np.ndarray:
    """(M, dim) `[sin, cos]` embedding of positions (M,), float64 as the reference."""
    omega = 1.0 / 10000 ** (np.arange(dim // 2, dtype=np.float64) / (dim / 2.0))
    angles = np.einsum("m,d->md", positions.reshape(-1), omega)
    return np.concatenate([np.sin(angles), np.cos(angles)], axis=1)


def sincos_pos_embed_2d(dim: int, grid_size: int) -> np.ndarray:
    """The reference's fixed 2-D position embedding (grid_size**2, dim).

    As in MAE/DiT, the meshgrid is built w first, so the first half of each row embeds
    the column (w) coordinate and the second half the row (h) coordinate.
    """
    coords = np.arange(grid_size, dtype=np.float32)
    grid = np.stack(np.meshgrid(coords, coords), axis=0).reshape(2, 1, grid_size, grid_size)
    return np.concatenate([_sincos_1d(dim // 2, grid[0]), _sincos_1d(dim // 2, grid[1])], axis=1)


class PatchEmbed(nn.Module):
    """Latents (N, C, H, W) → tokens (N, T, D) with a strided conv (timm's PatchEmbed)."""

    def __init__(self, patch_size: int, in_channels: int, hidden_size: int):
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Conv2d(in_channels, hidden_size, kernel_size=patch_size,
                              stride=patch_size, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)


class TimestepEmbedder(nn.Module):
    """Scalar timesteps (N,) → vectors (N, D): frequency embedding then a SiLU MLP."""

    def __init__(self, hidden_size: int, frequency_embedding_size: int = 256):
        super().__init__()
        self.frequency_embedding_size = frequency_embedding_size
        self.mlp = nn.Sequential(nn.Linear(frequency_embedding_size, hidden_size, bias=True),
                                 nn.SiLU(),
                                 nn.Linear(hidden_size, hidden_size, bias=True))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        t_freq = timestep_embedding(t, self.frequency_embedding_size)
        return self.mlp(t_freq.to(self.mlp[0].weight.dtype))


class LabelEmbedder(nn.Module):
    """Class labels (N,) → vectors (N, D); row num_classes is the null class of guidance."""

    def __init__(self, num_classes: int, hidden_size: int, dropout_prob: float):
        super().__init__()
        self.num_classes = num_classes
        self.dropout_prob = dropout_prob
        self.embedding_table = nn.Embedding(num_classes + int(dropout_prob > 0), hidden_size)

    def forward(self, labels: torch.Tensor, force_drop: torch.Tensor | None = None) -> torch.Tensor:
        if force_drop is not None:
            labels = torch.where(force_drop, self.num_classes, labels)
        return self.embedding_table(labels)


class Attention(nn.Module):
    """Multi-head self-attention with qkv bias (timm's), through torch's SDPA."""

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=True)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, t, d = x.shape
        qkv = self.qkv(x).reshape(n, t, 3, self.num_heads, d // self.num_heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each (N, heads, T, head_dim)
        x = F.scaled_dot_product_attention(q, k, v)
        return self.proj(x.transpose(1, 2).reshape(n, t, d))


class Mlp(nn.Module):
    """fc1 → GELU(tanh) → fc2 (timm's Mlp, as the reference builds it)."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU(approximate="tanh")
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class DiTBlock(nn.Module):
    """A transformer block with adaLN-Zero conditioning."""

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float):
        super().__init__()
        self.norm1 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(hidden_size, num_heads)
        self.norm2 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.mlp = Mlp(hidden_size, int(hidden_size * mlp_ratio))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 6 * hidden_size))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = (
            self.adaLN_modulation(c).chunk(6, dim=1))
        x = x + gate_msa.unsqueeze(1) * self.attn(modulate(self.norm1(x), shift_msa, scale_msa))
        return x + gate_mlp.unsqueeze(1) * self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))


class FinalLayer(nn.Module):
    """adaLN then a linear map of each token to a patch of the output (N, T, p*p*C_out)."""

    def __init__(self, hidden_size: int, patch_size: int, out_channels: int):
        super().__init__()
        self.norm_final = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(hidden_size, patch_size * patch_size * out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)
        return self.linear(modulate(self.norm_final(x), shift, scale))


class DiT(nn.Module):
    """DiT, or the slice of it holding blocks [start, end) and optionally both ends.

    A whole model has blocks (0, depth), the embedders and the final layer; stage 0 of a
    pipeline has the embedders, the last stage the final layer, middle stages blocks only.
    """

    def __init__(self, config: DiTConfig, blocks: tuple[int, int] | None = None,
                 embedders: bool = True, final_layer: bool = True):
        super().__init__()
        self.config = config
        self.block_range = blocks if blocks is not None else (0, config.depth)
        d = config.hidden_size
        if embedders:
            self.x_embedder = PatchEmbed(config.patch_size, config.in_channels, d)
            self.t_embedder = TimestepEmbedder(d)
            self.y_embedder = LabelEmbedder(config.num_classes, d, config.class_dropout_prob)
            grid = config.input_size // config.patch_size
            pos = torch.from_numpy(sincos_pos_embed_2d(d, grid)).float().unsqueeze(0)
            self.pos_embed = nn.Parameter(pos, requires_grad=False)  # (1, T, D), fixed
        # Keyed by global index, so a slice's state-dict keys are the whole model's.
        self.blocks = nn.ModuleDict({str(i): DiTBlock(d, config.num_heads, config.mlp_ratio)
                                     for i in range(*self.block_range)})
        if final_layer:
            self.final_layer = FinalLayer(d, config.patch_size, config.out_channels)

    @property
    def has_embedders(self) -> bool:
        return hasattr(self, "x_embedder")

    @property
    def has_final_layer(self) -> bool:
        return hasattr(self, "final_layer")

    def initialize_weights(self) -> None:
        """The reference's init (xavier, adaLN-Zero), for training the demo model."""
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)
        if self.has_embedders:
            w = self.x_embedder.proj.weight.data
            nn.init.xavier_uniform_(w.view(w.shape[0], -1))
            nn.init.zeros_(self.x_embedder.proj.bias)
            nn.init.normal_(self.y_embedder.embedding_table.weight, std=0.02)
            nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
            nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)
        for block in self.blocks.values():
            nn.init.zeros_(block.adaLN_modulation[-1].weight)
            nn.init.zeros_(block.adaLN_modulation[-1].bias)
        if self.has_final_layer:
            for layer in (self.final_layer.adaLN_modulation[-1], self.final_layer.linear):
                nn.init.zeros_(layer.weight)
                nn.init.zeros_(layer.bias)

    def embed(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor,
              drop_labels: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Latents x (N, C, H, W), timesteps t (N,), labels y (N,) → tokens h (N, T, D)
        and adaLN conditioning c (N, D)."""
        dtype = self.x_embedder.proj.weight.dtype
        h = self.x_embedder(x.to(dtype)) + self.pos_embed.to(dtype)
        c = self.t_embedder(t) + self.y_embedder(y, drop_labels)
        return h, c

    def run_blocks(self, h: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        """This slice's blocks: tokens h (N, T, D) → h (N, T, D)."""
        for block in self.blocks.values():
            h = block(h, c)
        return h

    def head(self, h: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        """Final layer and unpatchify: tokens (N, T, D) → output (N, C_out, H, W)."""
        return self.unpatchify(self.final_layer(h, c))

    def unpatchify(self, x: torch.Tensor) -> torch.Tensor:
        """(N, T, p*p*C) → (N, C, H, W), the reference's 'nhwpqc->nchpwq'."""
        c, p = self.config.out_channels, self.config.patch_size
        side = int(x.shape[1] ** 0.5)
        x = x.reshape(x.shape[0], side, side, p, p, c)
        return torch.einsum("nhwpqc->nchpwq", x).reshape(x.shape[0], c, side * p, side * p)

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor,
                drop_labels: torch.Tensor | None = None) -> torch.Tensor:
        """The whole model: x (N, C, H, W), t (N,), y (N,) → (N, C_out, H, W)."""
        h, c = self.embed(x, t, y, drop_labels)
        return self.head(self.run_blocks(h, c), c)
