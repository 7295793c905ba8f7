"""Baselines without trained adapters: the training-free mode and static prompt reuse.

Training-free (used when no trained adapters are given, and kept as a baseline), for one target:

1. Eq. 3 pseudo-mask from the reference prototypes and the target's plain embedding (``1 x C x h x w``).
2. One prompt per 8-connected component of the pseudo-mask: a positive point on the component's most
   foreground-like cell, plus (``use_box``) the component's bounding box. Remote-sensing scenes hold dozens of
   objects, so components are ranked by their summed decision value and capped at ``max_prompts``.
3. All prompts go through SAM's prompt encoder and mask decoder in batches of ``chunk`` (one image embedding
   shared by the prompts; the decoder regrouped so that what does not depend on the prompt runs once, see
   :mod:`.shared_decoder`) -> ``N x 256 x 256`` low-res logits. With ``window_margin`` (the predictor's
   default :data:`DEFAULT_WINDOW_MARGIN`) each mask is upscaled only inside its box grown by that fraction:
   the attention still sees the whole tile, but a building's mask is not computed a tile away from it.
   With ``context`` (the predictor's default :data:`DEFAULT_CONTEXT`, "local decoding") each prompt is
   instead decoded on a square crop of the embedding around its box (:func:`context_windows`): ~8x less
   decoder time on a CPU, masks IoU ~0.95 with the whole-tile decoding, the same accuracy against the truth.
4. Each SAM mask is kept when its mean embedding (mask-weighted pooling on the embedding grid) is more similar
   to the foreground prototype than to every valid background prototype (no valid bg prototype: more similar
   to the fg prototype than the image's mean similarity).
5. The union of the kept masks: the element-wise max of their logits (= max of their probabilities).

Static prompt reuse (the paper's ablation baseline): the reference masks' own prompts - per connected
component its most interior pixel (distance-transform maximum) and its bounding box, in coordinates relative
to the reference image - are replayed unchanged on the target; the union of SAM's masks is the prediction.

All coordinates given to SAM are in the padded 1024-px input frame.
"""

from __future__ import annotations

import weakref
from typing import Dict, List, Optional, Tuple

import numpy as np
import torch
import torch.nn.functional as F

from .prototypes import Prototypes, pseudo_mask, similarity_maps

NO_MASK_LOGIT = -20.0  # the "nothing here" logit of an empty union (sigmoid ~ 2e-9)
_EIGHT = np.ones((3, 3), dtype=bool)


def component_prompts(
    mask: np.ndarray, margin: np.ndarray, max_prompts: int = 32, img_size: int = 1024
) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Prompts from the pseudo-mask's 8-connected components.

    mask, margin: h x w (bool, float). Returns ``points N x 2`` (x, y), ``boxes N x 4`` (x0, y0, x1, y1), both
    in input-frame pixels, and ``scores N`` (summed margin of the component), best first, N <= max_prompts.
    """
    from scipy import ndimage

    h, w = mask.shape
    cell = img_size / w
    labels, n = ndimage.label(mask, structure=_EIGHT)
    if n == 0:
        return np.zeros((0, 2), np.float32), np.zeros((0, 4), np.float32), np.zeros(0, np.float32)
    ids = np.arange(1, n + 1)
    pos_margin = np.where(mask, margin, 0.0)
    scores = ndimage.sum_labels(pos_margin, labels, ids)
    order = np.argsort(-scores, kind="stable")[:max_prompts]
    peaks = ndimage.maximum_position(np.where(mask, margin, -np.inf), labels, ids[order])
    slices = ndimage.find_objects(labels)
    points, boxes = [], []
    for k, (py, px) in zip(order, peaks):
        sy, sx = slices[k]
        points.append(((px + 0.5) * cell - 0.5, (py + 0.5) * cell - 0.5))
        boxes.append((sx.start * cell, sy.start * cell, sx.stop * cell, sy.stop * cell))
    return np.asarray(points, np.float32), np.asarray(boxes, np.float32), scores[order].astype(np.float32)


DEFAULT_CONTEXT = (0.5, 8)  # local decoding: crop = box x (1 + 2 x 0.5), at least 8 x 8 embedding cells
CONTEXT_STEP = 4  # crop sides are multiples of this many cells: prompts of one size share the image-side work
DEFAULT_WINDOW_MARGIN = 0.5  # the predictor's: masks within 1.5x their box (IoU >= 0.997 with whole-image masks)
WINDOW_MIN_CELLS = 4  # smallest margin of a mask window, in embedding cells (16 px of the 1024 input each)


def prompt_windows(boxes: torch.Tensor, margin: float, grid: Tuple[int, int], cell: float) -> torch.Tensor:
    """Mask windows around prompts: boxes N x 4 (x0, y0, x1, y1, input px) grown by ``margin`` x their larger
    side and at least :data:`WINDOW_MIN_CELLS` cells -> N x 4 long (row0, col0, row1, col1) on the ``grid``."""
    b = boxes.detach().float().cpu() / cell
    side = torch.maximum(b[:, 2] - b[:, 0], b[:, 3] - b[:, 1])
    pad = torch.clamp(side * margin, min=float(WINDOW_MIN_CELLS))
    h, w = int(grid[0]), int(grid[1])
    r0 = torch.floor(b[:, 1] - pad).clamp(0, h)
    c0 = torch.floor(b[:, 0] - pad).clamp(0, w)
    r1 = torch.ceil(b[:, 3] + pad).clamp(0, h)
    c1 = torch.ceil(b[:, 2] + pad).clamp(0, w)
    return torch.stack([r0, c0, r1, c1], dim=1).long()


_DENSE_PE: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def dense_pe(sam) -> torch.Tensor:
    """``sam.prompt_encoder.get_dense_pe()`` (1 x C x h x w), computed once per prompt encoder and device: it
    depends only on the encoder's fixed random Fourier matrix (a buffer) and the grid size (~7 ms a call on a
    CPU, a sixth of a tile's local decoding). Recomputed with gradients enabled (training never caches)."""
    pe_enc = sam.prompt_encoder
    if torch.is_grad_enabled():
        return pe_enc.get_dense_pe()
    gauss = pe_enc.pe_layer.positional_encoding_gaussian_matrix
    key = (gauss.device, gauss.data_ptr(), tuple(pe_enc.image_embedding_size))
    hit = _DENSE_PE.get(pe_enc)
    if hit is None or hit[0] != key:
        hit = (key, pe_enc.get_dense_pe().detach().clone())
        _DENSE_PE[pe_enc] = hit
    return hit[1]


def decoder_context(decoding: str) -> Optional[Tuple[float, int]]:
    """``RunParams.decoding`` / eval's ``--decoding`` -> the predictor's ``decoder_context``: ``local`` ->
    :data:`DEFAULT_CONTEXT`, ``exact`` -> None (the whole tile), ``MARGIN,CELLS`` -> (margin, cells)."""
    from ..errors import InputError

    if decoding == "local":
        return DEFAULT_CONTEXT
    if decoding == "exact":
        return None
    try:
        margin, cells = decoding.split(",")
        return float(margin), int(cells)
    except ValueError:
        raise InputError(f"--decoding takes local, exact or MARGIN,CELLS (e.g. 0.5,8), not {decoding!r}.") from None


def context_windows(boxes: torch.Tensor, margin: float, min_cells: int, grid: Tuple[int, int], cell: float,
                    step: int = 4) -> torch.Tensor:
    """Square decoding contexts around prompts: boxes N x 4 (input px) -> N x 4 long (row0, col0, row1, col1)
    on the ``grid``: side = the box's larger side x (1 + 2 margin), at least ``min_cells``, rounded up to a
    multiple of ``step`` (so that prompts share sizes and batch), at most the grid; centred on the box and
    shifted to lie inside the grid."""
    b = boxes.detach().float().cpu() / cell
    h, w = int(grid[0]), int(grid[1])
    side = torch.maximum(b[:, 2] - b[:, 0], b[:, 3] - b[:, 1]) * (1 + 2 * margin)
    side = (torch.ceil(torch.clamp(side, min=float(min_cells)) / step) * step).long()
    sh, sw = side.clamp(max=h), side.clamp(max=w)
    cy, cx = (b[:, 1] + b[:, 3]) / 2, (b[:, 0] + b[:, 2]) / 2
    r0 = torch.round(cy - sh / 2).long().clamp(min=0)
    c0 = torch.round(cx - sw / 2).long().clamp(min=0)
    r0 = torch.minimum(r0, h - sh)
    c0 = torch.minimum(c0, w - sw)
    return torch.stack([r0, c0, r0 + sh, c0 + sw], dim=1)


def decode_prompts(
    sam,
    emb: torch.Tensor,
    points: Optional[torch.Tensor],
    boxes: Optional[torch.Tensor],
    chunk: int = 16,
    shared: bool = True,
    window_margin: Optional[float] = None,
    context: Optional[Tuple[float, int]] = None,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """N prompt sets on one image: emb 1 x C x h x w, points N x 2 (one positive point each) and/or boxes N x 4.
    -> (low-res logits N x 256 x 256, iou N). Single-mask output (a box disambiguates the point).

    ``shared`` (default): SAM's decoder regrouped for many prompts on one image (:mod:`.shared_decoder`: the
    prompt-independent work once, no per-prompt copy of the image; about half the time, the same logits within
    ~1e-4) when the decoder has SAM's structure and no gradient is needed; else ``sam.mask_decoder`` itself.
    ``chunk`` prompts go through the decoder at a time (memory: ~40 MB per prompt in flight).
    ``window_margin`` (shared decoder, prompts with a box): each mask is upscaled only inside its prompt's box
    grown by ``window_margin`` times the box's larger side and at least :data:`WINDOW_MIN_CELLS` embedding
    cells on every side; outside it the logits are :data:`NO_MASK_LOGIT` (see
    :func:`.shared_decoder.decode_single_mask`). None: whole-image masks.
    ``context`` ``(margin, min_cells)`` (shared decoder, prompts with a box): local decoding, each prompt on
    its own crop (:func:`context_windows`; prompts of one crop size batched together); ``window_margin`` is
    then not used.
    """
    from . import shared_decoder

    n = (points if points is not None else boxes).shape[0]
    pe = dense_pe(sam).to(emb.dtype)
    fast = (shared and emb.shape[0] == 1 and not (torch.is_grad_enabled() and emb.requires_grad)
            and shared_decoder.supports(sam))
    cell = float(sam.prompt_encoder.input_image_size[0]) / emb.shape[-1]
    crops = None  # local decoding: one crop per prompt with a box
    if fast and context is not None and boxes is not None:
        crops = context_windows(boxes, context[0], context[1], emb.shape[-2:], cell, step=CONTEXT_STEP)
    lows, ious = [], []
    for s in range(0, n, chunk):
        pts = None
        if points is not None:
            p = points[s : s + chunk].to(emb.device, emb.dtype)[:, None]
            pts = (p, torch.ones(p.shape[:2], dtype=torch.int, device=emb.device))
        bx = None if boxes is None else boxes[s : s + chunk].to(emb.device, emb.dtype)
        sparse, dense = sam.prompt_encoder(points=pts, boxes=bx, masks=None)
        if fast:
            win = None
            if crops is None and window_margin is not None and bx is not None:  # a point alone: no object size
                win = prompt_windows(bx, window_margin, emb.shape[-2:], cell)
            low, iou = shared_decoder.decode_single_mask(
                sam, emb, pe, sparse.to(emb.dtype), dense.to(emb.dtype), windows=win, fill=NO_MASK_LOGIT,
                context=None if crops is None else crops[s : s + chunk])
            lows.append(low)
            ious.append(iou)
            continue
        low, iou = sam.mask_decoder(
            image_embeddings=emb,
            image_pe=pe,
            sparse_prompt_embeddings=sparse.to(emb.dtype),
            dense_prompt_embeddings=dense.to(emb.dtype),
            multimask_output=False,
        )
        lows.append(low[:, 0])
        ious.append(iou[:, 0])
    return torch.cat(lows), torch.cat(ious)


def mask_prototype_match(
    feats: torch.Tensor, low: torch.Tensor, protos: Prototypes, valid: Optional[torch.Tensor] = None
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Which SAM masks look like the class. feats 1 x C x h x w, low N x 256 x 256 logits.

    Returns ``(keep N bool, fg_sim N, bg_sim N)``: cosine similarity of each mask's mean embedding to the fg
    prototype and the largest one to a valid bg prototype (without valid bg prototypes: the image's mean
    similarity to the fg prototype).
    """
    h, w = feats.shape[-2:]
    cover = F.adaptive_avg_pool2d((low > 0).to(feats.dtype)[:, None], (h, w))[:, 0]  # N x h x w
    if valid is not None:
        cover = cover * valid.to(feats.dtype)
    wsum = cover.sum(dim=(1, 2))
    mean = torch.einsum("chw,nhw->nc", feats[0], cover) / wsum.clamp_min(1e-6)[:, None]
    mean_n = F.normalize(mean, dim=-1)
    fg_sim = mean_n @ F.normalize(protos.fg[0], dim=-1)
    if bool(protos.bg_valid[0].any()):
        bg = F.normalize(protos.bg[0][protos.bg_valid[0]], dim=-1)
        bg_sim = (mean_n @ bg.t()).max(dim=1).values
    else:
        sim, _ = similarity_maps(feats, protos)
        vv = valid.reshape(sim[0].shape).to(torch.bool) if valid is not None else torch.ones_like(sim[0] > 0)
        bg_sim = sim[0][vv].mean().expand_as(fg_sim)
    keep = (fg_sim > bg_sim) & (wsum > 0)
    return keep, fg_sim, bg_sim


def union_logits(low: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """Max of the kept masks' logits -> 1 x 1 x 256 x 256 (NO_MASK_LOGIT everywhere when none is kept)."""
    if low.shape[0] == 0 or not bool(keep.any()):
        size = low.shape[-2:] if low.dim() == 3 else (256, 256)
        return torch.full((1, 1, *size), NO_MASK_LOGIT, device=low.device, dtype=low.dtype)
    return low[keep].max(dim=0).values[None, None]


def training_free_logits(
    sam,
    feats: torch.Tensor,
    protos: Prototypes,
    valid: Optional[torch.Tensor] = None,
    max_prompts: int = 32,
    use_box: bool = True,
    chunk: int = 16,
    emb: Optional[torch.Tensor] = None,
    shared: bool = True,
    window_margin: Optional[float] = None,
    context: Optional[Tuple[float, int]] = None,
) -> Tuple[torch.Tensor, Dict[str, object]]:
    """The training-free mode for one target. feats 1 x C x 64 x 64 (plain embedding, used for matching and,
    unless ``emb`` is given, for decoding), protos batch 1, valid 1 x 64 x 64 bool; ``shared``: see
    :func:`decode_prompts` (False: SAM's decoder module, for comparison).
    -> (low-res logits 1 x 1 x 256 x 256, info: pseudo_mask, n_prompts, n_kept, fg_sim, bg_sim)."""
    emb = feats if emb is None else emb
    protos = protos.to(device=feats.device, dtype=feats.dtype)
    pmask, margin, _ = pseudo_mask(feats, protos, valid)
    pts, bxs, _ = component_prompts(
        pmask[0].cpu().numpy(),
        margin[0].float().cpu().numpy(),
        max_prompts,
        img_size=int(sam.prompt_encoder.input_image_size[0]),
    )
    info: Dict[str, object] = {"pseudo_mask": pmask, "n_prompts": len(pts), "n_kept": 0}
    if len(pts) == 0:
        return union_logits(feats.new_zeros(0, 256, 256), torch.zeros(0, dtype=torch.bool)), info
    points = torch.from_numpy(pts)
    boxes = torch.from_numpy(bxs) if use_box else None
    low, _ = decode_prompts(sam, emb, points, boxes, chunk, shared=shared, window_margin=window_margin,
                             context=context)
    keep, fg_sim, bg_sim = mask_prototype_match(feats, low, protos, valid)
    info.update(n_kept=int(keep.sum()), fg_sim=fg_sim, bg_sim=bg_sim)
    return union_logits(low, keep), info


# --------------------------------------------------------------------------------------------------------------
# static prompt reuse
# --------------------------------------------------------------------------------------------------------------
def static_prompts_from_mask(mask: np.ndarray, max_prompts: int = 32) -> Tuple[np.ndarray, np.ndarray]:
    """Prompts of a reference mask (H x W bool) relative to its size: ``points N x 2`` (x/W, y/H, the most
    interior pixel of each component) and ``boxes N x 4`` (x0/W, y0/H, x1/W, y1/H), largest components first."""
    from scipy import ndimage

    mask = np.asarray(mask, dtype=bool)
    hh, ww = mask.shape
    labels, n = ndimage.label(mask, structure=_EIGHT)
    if n == 0:
        return np.zeros((0, 2), np.float32), np.zeros((0, 4), np.float32)
    ids = np.arange(1, n + 1)
    areas = ndimage.sum_labels(mask, labels, ids)
    order = np.argsort(-areas, kind="stable")[:max_prompts]
    dist = ndimage.distance_transform_edt(mask)
    peaks = ndimage.maximum_position(dist, labels, ids[order])
    slices = ndimage.find_objects(labels)
    points: List[Tuple[float, float]] = []
    boxes: List[Tuple[float, float, float, float]] = []
    for k, (py, px) in zip(order, peaks):
        sy, sx = slices[k]
        points.append(((px + 0.5) / ww, (py + 0.5) / hh))
        boxes.append((sx.start / ww, sy.start / hh, sx.stop / ww, sy.stop / hh))
    return np.asarray(points, np.float32), np.asarray(boxes, np.float32)


def static_prompt_logits(
    sam,
    emb: torch.Tensor,
    points_rel: np.ndarray,
    boxes_rel: np.ndarray,
    input_size: Tuple[int, int],
    use_box: bool = True,
    chunk: int = 16,
) -> torch.Tensor:
    """Replay relative reference prompts on a target whose resized size in the input frame is ``input_size``
    (h, w) -> union of SAM's masks as low-res logits 1 x 1 x 256 x 256."""
    if len(points_rel) == 0:
        return union_logits(emb.new_zeros(0, 256, 256), torch.zeros(0, dtype=torch.bool))
    h, w = input_size
    scale = np.asarray([w, h], np.float32)
    points = torch.from_numpy(points_rel * scale - 0.5)
    boxes = torch.from_numpy(boxes_rel * np.concatenate([scale, scale])) if use_box else None
    low, _ = decode_prompts(sam, emb, points, boxes, chunk)
    return union_logits(low, torch.ones(low.shape[0], dtype=torch.bool, device=low.device))
