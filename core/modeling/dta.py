"""Dynamic Target Alignment (DTA) adapter, ViRefSAM Eqs. 5-6, and its insertion into SAM's frozen image encoder.

Eq. 5 adds a trainable branch in parallel to the attention sub-layer of every encoder block::

    x' = x + Attn(Norm(x)) + DTA(x)        # then the block's own MLP sub-layer on x' (unchanged)

Eq. 6, the adapter (per block, C = the block's width, C_d = 64)::

    d   = GELU(Linear_C->C_d(x))                                   B x H x W x C_d
    pos = Linear_256->C_d(prototype table)[assignment]             B x H x W x C_d  (each pixel gets the prototype
                                                                   of the region the pseudo-mask assigns it to)
    z   = GELU(Conv1x1_2C_d->C_d([d, pos]))                        B x H x W x C_d
    DTA(x) = Linear_C_d->C(z)                                      B x H x W x C   (zero-initialised)

The up-projection is zero-initialised, so an untrained :class:`AdaptedEncoder` returns exactly what the plain
encoder returns (``(x + attn) + 0`` is bit-identical to ``x + attn``).

Supported encoders (detected by structure, not by class, so copies of the classes work too):

* ``vit`` - segment_anything ``ImageEncoderViT`` (ViT-B/L/H): blocks take ``B x 64 x 64 x C`` (C = 768/1024/1280),
  windowed (14) or global attention with relative positions; one adapter per block (12/24/32).
* ``tinyvit`` - MobileSAM ``TinyViT``: ``layers[0]`` is a ``ConvLayer`` of MBConv blocks (no attention
  sub-layer, so no adapter: Eq. 5 has nothing to run in parallel with); ``layers[1:]`` are ``BasicLayer`` of
  ``TinyViTBlock`` taking ``B x L x C`` tokens: layer 1 = 2 blocks at 128x128 (C=128, window 7), layer 2 =
  6 blocks at 64x64 (C=160, window 14), layer 3 = 2 blocks at 64x64 (C=320, window 7): 10 adapters. In a
  TinyViTBlock the DTA term is added after the attention residual, before the block's local 3x3 depth-wise conv
  and MLP.

The context (prototype table ``B x P x 256`` and assignment ``B x 64 x 64`` long in ``[0, P]``, where ``P``
indexes a zero "no prototype" row) is passed to every forward; the assignment is resampled (nearest) to each
block's grid.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import ModelError


@dataclass
class DTAContext:
    """table: B x P x D (prototypes: fg, bg_1..bg_Nb); assign: B x h x w long in [0, P] (P = no prototype)."""

    table: torch.Tensor
    assign: torch.Tensor


class DTAAdapter(nn.Module):
    """One block's DTA branch (Eq. 6). ``x`` B x H x W x C -> B x H x W x C."""

    def __init__(self, dim: int, proto_dim: int = 256, hidden: int = 64) -> None:
        super().__init__()
        self.dim, self.hidden = dim, hidden
        self.down = nn.Linear(dim, hidden)
        self.proto_proj = nn.Linear(proto_dim, hidden)
        self.fuse = nn.Conv2d(2 * hidden, hidden, kernel_size=1)
        self.act = nn.GELU()
        self.up = nn.Linear(hidden, dim)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def position_encoding(self, table: torch.Tensor, assign: torch.Tensor) -> torch.Tensor:
        """Each pixel gets its assigned prototype, projected: table B x P x D, assign B x H x W -> B x H x W x C_d."""
        proj = self.proto_proj(table)  # B x P x C_d
        proj = torch.cat([proj, proj.new_zeros(proj.shape[0], 1, proj.shape[2])], dim=1)  # + "no prototype"
        b = torch.arange(proj.shape[0], device=proj.device)[:, None, None]
        return proj[b, assign]

    def forward(self, x: torch.Tensor, table: torch.Tensor, assign: torch.Tensor) -> torch.Tensor:
        d = self.act(self.down(x))
        pos = self.position_encoding(table.to(x.dtype), assign)
        z = torch.cat([d, pos], dim=-1).permute(0, 3, 1, 2)
        z = self.act(self.fuse(z)).permute(0, 2, 3, 1)
        return self.up(z)


def _is_tinyvit(encoder: nn.Module) -> bool:
    return hasattr(encoder, "layers") and hasattr(encoder, "patch_embed") and hasattr(encoder, "neck")


def _is_vit(encoder: nn.Module) -> bool:
    blocks = getattr(encoder, "blocks", None)
    return blocks is not None and len(blocks) > 0 and all(
        hasattr(b, "norm1") and hasattr(b, "attn") and hasattr(b, "mlp") for b in blocks
    )


def _tinyvit_attention(blk: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The attention sub-layer of a TinyViTBlock on B x L x C tokens (windowing as in TinyViTBlock.forward)."""
    H, W = blk.input_resolution
    B, L, C = x.shape
    ws = blk.window_size
    if H == ws and W == ws:
        return blk.attn(x)
    x = x.view(B, H, W, C)
    pad_b = (ws - H % ws) % ws
    pad_r = (ws - W % ws) % ws
    if pad_b > 0 or pad_r > 0:
        x = F.pad(x, (0, 0, 0, pad_r, 0, pad_b))
    pH, pW = H + pad_b, W + pad_r
    nH, nW = pH // ws, pW // ws
    x = x.view(B, nH, ws, nW, ws, C).transpose(2, 3).reshape(B * nH * nW, ws * ws, C)
    x = blk.attn(x)
    x = x.view(B, nH, nW, ws, ws, C).transpose(2, 3).reshape(B, pH, pW, C)
    if pad_b > 0 or pad_r > 0:
        x = x[:, :H, :W].contiguous()
    return x.view(B, L, C)


def _vit_attention(blk: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Attn(Norm(x)) of a segment_anything ViT Block on B x H x W x C (window partition as in Block.forward)."""
    from segment_anything.modeling.image_encoder import window_partition, window_unpartition

    x = blk.norm1(x)
    if blk.window_size > 0:
        H, W = x.shape[1], x.shape[2]
        x, pad_hw = window_partition(x, blk.window_size)
    x = blk.attn(x)
    if blk.window_size > 0:
        x = window_unpartition(x, blk.window_size, pad_hw, (H, W))
    return x


class AdaptedEncoder(nn.Module):
    """SAM's frozen image encoder with a DTA adapter in parallel to the attention of every block.

    ``forward(x B x 3 x 1024 x 1024, ctx)`` -> B x 256 x 64 x 64, the same contract as the plain encoder. The
    frozen encoder is a registered submodule (moved by ``.to``) but its parameters stay ``requires_grad=False``;
    only ``self.adapters`` are trainable.
    """

    def __init__(self, encoder: nn.Module, proto_dim: int = 256, hidden: int = 64) -> None:
        super().__init__()
        self.encoder = encoder
        self.proto_dim, self.hidden = proto_dim, hidden
        dims: List[int] = []
        grids: List[Tuple[int, int]] = []
        if _is_tinyvit(encoder):
            self.kind = "tinyvit"
            for layer in encoder.layers[1:]:
                for blk in layer.blocks:
                    dims.append(int(blk.dim))
                    grids.append(tuple(int(v) for v in blk.input_resolution))
        elif _is_vit(encoder):
            self.kind = "vit"
            img = int(getattr(encoder, "img_size", 1024))
            patch = int(encoder.patch_embed.proj.kernel_size[0])
            for blk in encoder.blocks:
                dims.append(int(blk.norm1.normalized_shape[0]))
                grids.append((img // patch, img // patch))
        else:
            raise ModelError(
                f"The image encoder {type(encoder).__name__} is neither a SAM ViT nor a MobileSAM TinyViT; "
                "ViRefSAM adapters cannot be attached to it."
            )
        self.dims, self.grids = dims, grids
        self.adapters = nn.ModuleList([DTAAdapter(d, proto_dim, hidden) for d in dims])

    # -- identity of the backbone the adapters are made for ---------------------------------------------------
    def signature(self) -> Dict[str, object]:
        """Architecture of the adapted blocks plus a fingerprint of the frozen weights."""
        return {
            "kind": self.kind,
            "dims": list(self.dims),
            "grids": [list(g) for g in self.grids],
            "hidden": self.hidden,
            "proto_dim": self.proto_dim,
            "probe": encoder_probe(self.encoder),
        }

    # -- forward ----------------------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor, ctx: DTAContext) -> torch.Tensor:
        return self.forward_from_stem(self.stem(x), ctx)

    def stem(self, x: torch.Tensor) -> torch.Tensor:
        """What runs before the first adapted block, the same as in the plain encoder: B x 3 x 1024 x 1024 ->
        TinyViT: B x L x C tokens after ``layers[0]`` (L = 128², C = 128); ViT: B x 64 x 64 x C patches."""
        enc = self.encoder
        x = enc.patch_embed(x)
        if self.kind == "vit":
            return x + enc.pos_embed if enc.pos_embed is not None else x
        return enc.layers[0](x)

    def forward_from_stem(self, x: torch.Tensor, ctx: DTAContext) -> torch.Tensor:
        """The adapted blocks and the neck on the output of :meth:`stem` -> B x 256 x 64 x 64."""
        cache: Dict[Tuple[int, int], torch.Tensor] = {}

        def assign_at(grid: Tuple[int, int]) -> torch.Tensor:
            if grid not in cache:
                a = ctx.assign
                if tuple(a.shape[-2:]) != grid:
                    a = F.interpolate(a[:, None].float(), size=grid, mode="nearest")[:, 0].long()
                cache[grid] = a
            return cache[grid]

        table = ctx.table
        enc = self.encoder
        if self.kind == "vit":
            for blk, ad in zip(enc.blocks, self.adapters):
                shortcut = x
                x = shortcut + _vit_attention(blk, x)
                x = x + ad(shortcut, table, assign_at(tuple(shortcut.shape[1:3])))
                x = x + blk.mlp(blk.norm2(x))
            return enc.neck(x.permute(0, 3, 1, 2))

        # TinyViT (grid sizes from the blocks, not from tensor shapes: the graph traces to ONNX with fixed sizes)
        i = 0
        for layer in enc.layers[1:]:
            for blk in layer.blocks:
                ad = self.adapters[i]
                i += 1
                H, W = blk.input_resolution
                B, L, C = x.shape
                res_x = x
                x = res_x + blk.drop_path(_tinyvit_attention(blk, x))
                x = x + ad(res_x.view(B, H, W, C), table, assign_at((H, W))).view(B, L, C)
                x = x.transpose(1, 2).reshape(B, C, H, W)
                x = blk.local_conv(x)
                x = x.view(B, C, L).transpose(1, 2)
                x = x + blk.drop_path(blk.mlp(x))
            if layer.downsample is not None:
                x = layer.downsample(x)
        B, _, C = x.shape
        side_h, side_w = self.grids[-1]
        x = x.view(B, side_h, side_w, C).permute(0, 3, 1, 2)
        return enc.neck(x)


def encoder_probe(encoder: nn.Module, n: int = 16) -> List[float]:
    """A few float32 values of the encoder's first parameters and its neck: they tell backbones of the same
    architecture with different weights apart, and survive bf16/fp16 casts within a loose tolerance."""
    params = list(encoder.named_parameters())
    picked = params[:2] + [p for p in params if p[0].startswith("neck.")]
    out: List[float] = []
    for _, p in picked:
        out.extend(p.detach().reshape(-1)[:n].to("cpu", torch.float32).tolist())
    return out


def check_signature(saved: Dict[str, object], current: Dict[str, object]) -> None:
    """Raise ModelError unless adapters saved with ``saved`` fit a backbone with signature ``current``."""
    for key in ("kind", "dims", "grids", "hidden", "proto_dim"):
        if saved.get(key) != current.get(key):
            raise ModelError(
                f"These adapters were trained for another SAM backbone ({key}: {saved.get(key)} here "
                f"{current.get(key)}); choose the adapters made for this model or run without adapters."
            )
    a = torch.tensor(saved.get("probe", []), dtype=torch.float32)
    b = torch.tensor(current.get("probe", []), dtype=torch.float32)
    if a.shape != b.shape or not torch.allclose(a, b, rtol=2e-2, atol=2e-3):
        raise ModelError(
            "These adapters were trained on other weights of this SAM architecture; choose the adapters made "
            "for this model's checkpoint or run without adapters."
        )
