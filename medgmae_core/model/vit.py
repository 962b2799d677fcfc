"""3D ViT encoder with MAE random masking.

Parameter names follow MONAI's ``ViT`` (``patch_embedding.patch_embeddings``,
``patch_embedding.position_embeddings``, ``blocks.N.*``, ``norm``), and the blocks are MONAI
``TransformerBlock``s, so ``model.encoder``'s weights load into MONAI ViT/UNETR after dropping
``cls_token`` (and adapting the position embedding if the grid differs).
"""
from __future__ import annotations

import math

import torch
from monai.networks.blocks import TransformerBlock
from torch import nn


def sincos_position_embedding_3d(grid_size: tuple[int, int, int], dim: int) -> torch.Tensor:
    """Fixed 3D sine-cosine embedding ``[L, dim]`` of the patch grid, ``L = D*H*W`` in row-major (d, h, w) order."""
    axes = [torch.arange(n, dtype=torch.float64) for n in grid_size]
    coords = torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=-1).reshape(-1, 3)  # [L, 3]
    return sincos_embedding_3d(coords, dim)


def sincos_embedding_3d(coords: torch.Tensor, dim: int) -> torch.Tensor:
    """Sine-cosine embedding ``[L, dim]`` of points ``coords [L, 3]`` given in patch-index units (patch ``p``'s
    centre is ``p``; fractional values lie between patches). Each axis gets ``dim/6`` frequencies
    ``1 / 10000^(j/(dim/6))``: ``[sin, cos]`` along D, then H, then W."""
    if dim % 6 != 0:
        raise ValueError(f"embedding dim {dim} must be divisible by 6 for a 3D sine-cosine position embedding")
    n_freq = dim // 6
    omega = 1.0 / 10000.0 ** (torch.arange(n_freq, dtype=torch.float64) / n_freq)  # [F]
    coords = coords.to(torch.float64)
    parts = []
    for a in range(3):
        angle = coords[:, a, None] * omega[None]  # [L, F]
        parts += [torch.sin(angle), torch.cos(angle)]
    return torch.cat(parts, dim=1).float()  # [L, dim]


def transformer_blocks(dim: int, depth: int, num_heads: int, mlp_ratio: float) -> nn.ModuleList:
    """Pre-norm ViT blocks (MONAI ``TransformerBlock``, qkv bias, SDPA attention).

    MONAI creates a ``norm_cross_attn`` LayerNorm even without cross-attention; it never
    takes part in the forward pass, so it is frozen here (keeps DDP and "every trainable
    parameter gets a gradient" honest) and kept for state-dict compatibility with MONAI ViT.
    """
    blocks = nn.ModuleList([
        TransformerBlock(dim, int(dim * mlp_ratio), num_heads, qkv_bias=True, use_flash_attention=True)
        for _ in range(depth)
    ])
    for block in blocks:
        block.norm_cross_attn.requires_grad_(False)
    return blocks


def patch_coordinates(grid_size: tuple[int, int, int]) -> torch.Tensor:
    """``[L, 3]`` patch-index coordinates (d, h, w) in row-major order, as the position embeddings use."""
    axes = [torch.arange(n, dtype=torch.float32) for n in grid_size]
    return torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=-1).reshape(-1, 3)


def local_context(query_pos: torch.Tensor, key_pos: torch.Tensor, tokens: torch.Tensor, radius: float) -> torch.Tensor:
    """Gaussian-weighted mean of ``tokens [B, K, D]`` at ``key_pos [B, K, 3]`` around each query at
    ``query_pos [Q, 3]`` or ``[B, Q, 3]`` (patch-index units), weights ``softmax(-|q - k|^2 / (2 radius^2))`` ->
    ``[B, Q, D]``. A fixed, local cross-attention: a query starts from what the visible patches near it show."""
    query_pos = query_pos if query_pos.dim() == 3 else query_pos[None]  # [B or 1, Q, 3]
    d2 = ((query_pos[:, :, None, :] - key_pos[:, None, :, :]) ** 2).sum(-1)  # [B, Q, K]
    weights = torch.softmax(-d2 / (2.0 * radius ** 2), dim=-1)
    return weights.to(tokens.dtype) @ tokens  # [B, Q, D]


def init_vit_weights(module: nn.Module) -> None:
    """MAE initialisation: xavier-uniform linears with zero bias, unit LayerNorms."""
    if isinstance(module, nn.Linear):
        nn.init.xavier_uniform_(module.weight)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)


def random_masking(x: torch.Tensor, mask_ratio: float, generator: torch.Generator | None = None,
                   noise: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """MAE per-sample masking by argsort of uniform noise (or of a given ``noise [B, L]``: the lowest
    ``L_keep`` values are kept, which is how complementary inference masks are chosen).

    x ``[B, L, C]`` -> (kept tokens ``[B, L_keep, C]``, mask ``[B, L]`` with 1 = masked,
    ids_restore ``[B, L]``), ``L_keep = L - round(L * mask_ratio)``.
    """
    if not 0.0 <= mask_ratio < 1.0:
        raise ValueError(f"mask_ratio must be in [0, 1), got {mask_ratio}")
    batch, length, channels = x.shape
    len_keep = length - int(round(length * mask_ratio))
    if noise is None:
        noise = torch.rand(batch, length, device=x.device, generator=generator)  # [B, L]
    elif tuple(noise.shape) != (batch, length):
        raise ValueError(f"noise must have shape [B, L] = [{batch}, {length}], got {list(noise.shape)}")
    ids_shuffle = torch.argsort(noise, dim=1)  # ascending: the first len_keep are kept
    ids_restore = torch.argsort(ids_shuffle, dim=1)  # [B, L]
    ids_keep = ids_shuffle[:, :len_keep]  # [B, L_keep]
    x_kept = torch.gather(x, 1, ids_keep[..., None].expand(-1, -1, channels))  # [B, L_keep, C]
    mask = torch.ones(batch, length, device=x.device, dtype=torch.float32)
    mask[:, :len_keep] = 0
    mask = torch.gather(mask, 1, ids_restore)  # [B, L] in patch order
    return x_kept, mask, ids_restore


class PatchEmbedding3D(nn.Module):
    """Conv3d patch embedding (kernel = stride = patch) plus the fixed sin-cos position embedding."""

    def __init__(self, img_size: tuple[int, int, int], patch_size: tuple[int, int, int], in_chans: int, dim: int):
        super().__init__()
        self.img_size = tuple(img_size)
        self.patch_size = tuple(patch_size)
        self.grid_size = tuple(n // p for n, p in zip(img_size, patch_size))
        self.patch_embeddings = nn.Conv3d(in_chans, dim, kernel_size=patch_size, stride=patch_size)
        pos = sincos_position_embedding_3d(self.grid_size, dim)[None]  # [1, L, dim]
        self.position_embeddings = nn.Parameter(pos, requires_grad=False)
        # MAE: initialise the conv like a linear layer over the flattened patch
        w = self.patch_embeddings.weight.data
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.zeros_(self.patch_embeddings.bias)

    def forward(self, imgs: torch.Tensor) -> torch.Tensor:
        if tuple(imgs.shape[2:]) != self.img_size:
            raise ValueError(f"input volume has spatial shape {tuple(imgs.shape[2:])}, "
                             f"but the model was built for img_size {self.img_size}")
        x = self.patch_embeddings(imgs)  # [B, dim, d, h, w]
        x = x.flatten(2).transpose(1, 2)  # [B, L, dim]
        return x + self.position_embeddings


class ViTEncoder3D(nn.Module):
    """MAE encoder: embed patches, drop a random ``mask_ratio`` of them, run the visible ones."""

    def __init__(self, img_size: tuple[int, int, int], patch_size: tuple[int, int, int], in_chans: int,
                 embed_dim: int, depth: int, num_heads: int, mlp_ratio: float):
        super().__init__()
        self.patch_embedding = PatchEmbedding3D(img_size, patch_size, in_chans, embed_dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.blocks = transformer_blocks(embed_dim, depth, num_heads, mlp_ratio)
        self.norm = nn.LayerNorm(embed_dim)
        self.blocks.apply(init_vit_weights)
        self.norm.apply(init_vit_weights)
        nn.init.normal_(self.cls_token, std=0.02)

    @property
    def num_patches(self) -> int:
        return math.prod(self.patch_embedding.grid_size)

    def forward(self, imgs: torch.Tensor, mask_ratio: float, generator: torch.Generator | None = None,
                noise: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """imgs ``[B, C, D, H, W]`` -> (latent ``[B, 1 + L_keep, dim]``, mask ``[B, L]``, ids_restore ``[B, L]``)."""
        x = self.patch_embedding(imgs)  # [B, L, dim]
        x, mask, ids_restore = random_masking(x, mask_ratio, generator, noise)  # [B, L_keep, dim]
        cls = self.cls_token.expand(x.shape[0], -1, -1)  # the cls token carries no position
        x = torch.cat([cls, x], dim=1)  # [B, 1 + L_keep, dim]
        for block in self.blocks:
            x = block(x)
        return self.norm(x), mask, ids_restore
