"""The SSL-SoilNet Vision Transformer: image ``(B, C, 64, 64)`` -> ``(B, out)`` from the CLS token.

Patch 8 gives 64 tokens plus CLS; dim 768, depth 12, 12 heads, MLP 3072, qkv bias, LayerNorm eps 1e-6,
dropout 0.1 on positions, attention weights and projections (the seed's ``p=0.1, attn_p=0.1``) and, unlike the
seed, whose Block never passed ``p`` on to its MLP, the MLP. No activation follows the output Linear (the seed's
neither).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from soilnet.models.registry import register
from soilnet.schema import SampleSchema


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int, qkv_bias: bool, attn_p: float, proj_p: float):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.attn_p = attn_p
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_p)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v, dropout_p=self.attn_p if self.training else 0.0)
        return self.proj_drop(self.proj(out.transpose(1, 2).reshape(b, n, d)))


class Block(nn.Module):
    def __init__(self, dim: int, heads: int, mlp_dim: int, qkv_bias: bool, p: float, attn_p: float):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, heads, qkv_bias, attn_p, p)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = nn.Sequential(
            nn.Linear(dim, mlp_dim), nn.GELU(), nn.Dropout(p), nn.Linear(mlp_dim, dim), nn.Dropout(p)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class VisionTransformer(nn.Module):
    """image ``(B, C, S, S)`` -> ``(B, out)``; ``activation_checkpointing`` recomputes blocks in backward."""

    def __init__(
        self,
        in_channels: int,
        image_size: int = 64,
        patch_size: int = 8,
        out: int = 1024,
        dim: int = 768,
        depth: int = 12,
        heads: int = 12,
        mlp_dim: int = 3072,
        qkv_bias: bool = True,
        p: float = 0.1,
        attn_p: float = 0.1,
        activation_checkpointing: bool = False,
    ):
        super().__init__()
        if image_size % patch_size:
            raise ValueError(f"image size {image_size} is not divisible by patch size {patch_size}")
        self.out_features = out
        self.activation_checkpointing = activation_checkpointing
        self.patch_embed = nn.Conv2d(in_channels, dim, patch_size, stride=patch_size)
        n_tokens = (image_size // patch_size) ** 2 + 1
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, n_tokens, dim))
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        self.pos_drop = nn.Dropout(p)
        self.blocks = nn.ModuleList(Block(dim, heads, mlp_dim, qkv_bias, p, attn_p) for _ in range(depth))
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.head = nn.Linear(dim, out)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(image).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)
        x = self.pos_drop(x + self.pos_embed)
        for block in self.blocks:
            if self.activation_checkpointing and self.training:
                x = checkpoint(block, x, use_reentrant=False)
            else:
                x = block(x)
        return self.head(self.norm(x)[:, 0])

    def lr_blocks(self) -> list[tuple[str, list[nn.Parameter]]]:
        """Layer-wise LR decay levels, input first (as in BEiT and MAE): the patch embedding with the class token
        and position embedding, each transformer block, the final norm, the output Linear."""
        embed = [*self.patch_embed.parameters(), self.cls_token, self.pos_embed]
        blocks = [(f"blocks.{i}", list(block.parameters())) for i, block in enumerate(self.blocks)]
        top = [("norm", list(self.norm.parameters())), ("out", list(self.head.parameters()))]
        return [("embed", embed), *blocks, *top]


@register("image_encoder", "vit")
def vit(schema: SampleSchema, **kwargs) -> VisionTransformer:
    """The paper's ViT-B/8 by default; any keyword overrides (``out``, ``depth``, ``dim``...)."""
    return VisionTransformer(schema.n_channels, image_size=schema.patch_size, **kwargs)


@register("image_encoder", "vit_tiny")
def vit_tiny(schema: SampleSchema, out: int = 64, **kwargs) -> VisionTransformer:
    defaults = dict(dim=32, depth=2, heads=2, mlp_dim=64)
    return VisionTransformer(schema.n_channels, image_size=schema.patch_size, out=out, **{**defaults, **kwargs})
