"""Prototypes of a class from its reference(s) on SAM's image-embedding grid (ViRefSAM Eq. 1 and Eq. 3).

All tensors live on SAM's 64x64 embedding grid of the padded 1024x1024 input frame (one cell = 16x16 input
pixels). The frozen image encoder gives ``feats`` of shape ``K x C x h x w`` (C = 256, h = w = 64).

* Foreground prototype (Eq. 1, first half): masked average pooling of the reference features, weighted by the
  fraction of each cell the reference mask covers, pooled jointly over all K shots -> ``C``.
* Background prototypes (Eq. 1, second half): the reference background cells (cells less than half covered
  by the mask and at least half inside the image, i.e. not padding) of all shots are pooled as one point set
  in normalised grid coordinates ``(y/h, x/w)``; ``N_b`` Voronoi seeds are chosen among them by farthest-point
  sampling from a seeded random first seed (deterministic for a seed), each cell goes to its nearest seed
  (``torch.cdist`` + argmin, no per-pixel Python loop) so every background cell lies in exactly one region,
  and each region's prototype is the weighted mean of its cells. With fewer background cells (or fewer
  distinct positions) than ``N_b`` there are fewer regions; the missing ones are zero vectors with
  ``bg_valid = False``. With no background at all, every prototype is invalid and Eq. 3 falls back (below).
* Pseudo-mask (Eq. 3): a target cell is foreground when its cosine similarity to the fg prototype exceeds its
  largest similarity to the valid bg prototypes. Without any valid bg prototype the comparison is made
  against the mean fg similarity over the target's valid cells instead.
* Assignment (Eq. 6, used by the DTA adapter): 0 where the pseudo-mask is foreground, ``1 + j`` for the most
  similar valid bg prototype ``j`` elsewhere, ``1 + N_b`` (a zero "no prototype" row) on padding cells.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Tuple

import torch
import torch.nn.functional as F

GRID = 64  # SAM's embedding grid (1024 / 16)


@dataclass
class Prototypes:
    """Batched prototypes: ``fg`` B x C, ``fg_valid`` B, ``bg`` B x N_b x C, ``bg_valid`` B x N_b."""

    fg: torch.Tensor
    fg_valid: torch.Tensor
    bg: torch.Tensor
    bg_valid: torch.Tensor

    @property
    def n_bg(self) -> int:
        return self.bg.shape[1]

    def table(self) -> torch.Tensor:
        """B x (1 + N_b) x C: row 0 the foreground, rows 1.. the background prototypes."""
        return torch.cat([self.fg[:, None], self.bg], dim=1)

    def to(self, device=None, dtype=None) -> "Prototypes":
        return Prototypes(
            self.fg.to(device=device, dtype=dtype),
            self.fg_valid.to(device=device),
            self.bg.to(device=device, dtype=dtype),
            self.bg_valid.to(device=device),
        )

    def expand(self, batch: int) -> "Prototypes":
        """The same (batch-1) prototypes for ``batch`` targets."""
        if self.fg.shape[0] == batch:
            return self
        assert self.fg.shape[0] == 1, "only batch-1 prototypes can be expanded"
        return Prototypes(
            self.fg.expand(batch, -1),
            self.fg_valid.expand(batch),
            self.bg.expand(batch, -1, -1),
            self.bg_valid.expand(batch, -1),
        )

    @staticmethod
    def cat(items) -> "Prototypes":
        items = list(items)
        return Prototypes(
            torch.cat([p.fg for p in items]),
            torch.cat([p.fg_valid for p in items]),
            torch.cat([p.bg for p in items]),
            torch.cat([p.bg_valid for p in items]),
        )


# --------------------------------------------------------------------------------------------------------------
# masks on the grid
# --------------------------------------------------------------------------------------------------------------
def mask_to_grid(mask: torch.Tensor, grid: int = GRID) -> torch.Tensor:
    """Fraction of each grid cell covered: mask ``K x S x S`` or ``K x 1 x S x S`` (bool/float) -> K x grid x grid."""
    if mask.dim() == 3:
        mask = mask[:, None]
    return F.adaptive_avg_pool2d(mask.float(), grid)[:, 0]


def valid_grid(input_size: Tuple[int, int], img_size: int = 1024, grid: int = GRID, device=None) -> torch.Tensor:
    """grid x grid bool: cells at least half inside the resized image (SAM pads at the bottom and right)."""
    h, w = input_size
    cell = img_size / grid
    centres = (torch.arange(grid, device=device, dtype=torch.float32) + 0.5) * cell
    return (centres[:, None] < h) & (centres[None, :] < w)


# --------------------------------------------------------------------------------------------------------------
# Eq. 1
# --------------------------------------------------------------------------------------------------------------
def masked_average_pool(feats: torch.Tensor, weights: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Weighted mean of ``feats`` (K x C x h x w) over all shots and cells, weights K x h x w -> (C, valid)."""
    w = weights.to(feats.dtype)
    total = w.sum()
    pooled = torch.einsum("kchw,khw->c", feats, w)
    valid = total > 0
    return torch.where(valid, pooled / total.clamp_min(1e-12), torch.zeros_like(pooled)), valid


def farthest_point_seeds(points: torch.Tensor, n: int, seed: int = 0) -> torch.Tensor:
    """Indices of up to ``n`` Voronoi seeds among ``points`` (N x 2): seeded random first, then farthest-point.

    Fewer than ``n`` are returned when there are fewer distinct points. Deterministic for a given ``seed``;
    the loop runs over seeds (at most ``n``), every step is vectorised over the points.
    """
    npts = points.shape[0]
    if npts == 0 or n <= 0:
        return torch.zeros(0, dtype=torch.long, device=points.device)
    gen = torch.Generator().manual_seed(int(seed))
    first = int(torch.randint(npts, (1,), generator=gen))
    chosen = [first]
    min_d = (points - points[first]).pow(2).sum(-1)
    for _ in range(1, min(n, npts)):
        nxt = int(torch.argmax(min_d))
        if float(min_d[nxt]) <= 0.0:  # only duplicates of existing seeds are left
            break
        chosen.append(nxt)
        min_d = torch.minimum(min_d, (points - points[nxt]).pow(2).sum(-1))
    return torch.tensor(chosen, dtype=torch.long, device=points.device)


def voronoi_partition(points: torch.Tensor, n_regions: int, seed: int = 0) -> Tuple[torch.Tensor, torch.Tensor]:
    """Partition ``points`` (N x 2) into at most ``n_regions`` Voronoi regions.

    Returns ``(labels, seeds)``: labels N (long, region of each point, in ``[0, len(seeds))``), seeds the
    indices of the seed points. Every point gets exactly one region (nearest seed, ties to the lower index).
    """
    seeds = farthest_point_seeds(points, n_regions, seed)
    if seeds.numel() == 0:
        return torch.zeros(points.shape[0], dtype=torch.long, device=points.device), seeds
    labels = torch.cdist(points.float(), points[seeds].float()).argmin(dim=1)
    return labels, seeds


def background_cells(fg_frac: torch.Tensor, valid: Optional[torch.Tensor] = None) -> torch.Tensor:
    """K x h x w bool: cells less than half covered by the reference mask and inside the image."""
    bg = fg_frac < 0.5
    if valid is not None:
        bg = bg & valid.to(torch.bool)
    return bg


def background_prototypes(
    feats: torch.Tensor,
    fg_frac: torch.Tensor,
    valid: Optional[torch.Tensor] = None,
    n_regions: int = 5,
    seed: int = 0,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Voronoi background prototypes over all K shots.

    feats K x C x h x w, fg_frac K x h x w (mask coverage), valid K x h x w (or None = all cells).
    Returns ``(protos n_regions x C, proto_valid n_regions bool, region_map K x h x w long)``; region_map is
    -1 outside the background. Cells are weighted by their background fraction ``1 - fg_frac``.
    """
    k, c, h, w = feats.shape
    device = feats.device
    bg = background_cells(fg_frac, valid)
    protos = feats.new_zeros(n_regions, c)
    proto_valid = torch.zeros(n_regions, dtype=torch.bool, device=device)
    region_map = torch.full((k, h, w), -1, dtype=torch.long, device=device)
    idx = bg.nonzero(as_tuple=False)  # N x 3: shot, y, x
    if idx.shape[0] == 0:
        return protos, proto_valid, region_map
    pts = torch.stack([(idx[:, 1].float() + 0.5) / h, (idx[:, 2].float() + 0.5) / w], dim=1)
    labels, seeds = voronoi_partition(pts, n_regions, seed)
    r = seeds.numel()
    region_map[idx[:, 0], idx[:, 1], idx[:, 2]] = labels
    cell_feats = feats.permute(0, 2, 3, 1)[idx[:, 0], idx[:, 1], idx[:, 2]]  # N x C
    weight = (1.0 - fg_frac[idx[:, 0], idx[:, 1], idx[:, 2]]).to(feats.dtype)  # > 0.5 for bg cells
    onehot = F.one_hot(labels, r).to(feats.dtype) * weight[:, None]  # N x r
    sums = onehot.t() @ cell_feats  # r x C
    protos[:r] = sums / onehot.sum(0)[:, None].clamp_min(1e-12)
    proto_valid[:r] = True
    return protos, proto_valid, region_map


def build_prototypes(
    feats: torch.Tensor,
    fg_frac: torch.Tensor,
    valid: Optional[torch.Tensor] = None,
    n_bg: int = 5,
    seed: int = 0,
    per_shot: bool = False,
) -> Prototypes:
    """Eq. 1 over K shots: feats K x C x h x w, fg_frac K x h x w, valid K x h x w -> batch-1 Prototypes.

    The foreground prototype pools all shots. ``per_shot`` False: ``n_bg`` Voronoi regions over the background
    cells of all shots at once (cells of different shots at the same grid position share a region). True: ``n_bg``
    regions in each shot, ``K * n_bg`` background prototypes in all, so each one describes one scene's
    background (for K = 1 both are the same). VCP and DTA take any number of prototype rows.
    """
    fg_w = fg_frac if valid is None else fg_frac * valid.to(fg_frac.dtype)
    fg, fg_valid = masked_average_pool(feats, fg_w)
    if per_shot and feats.shape[0] > 1:
        parts = [background_prototypes(feats[k : k + 1], fg_frac[k : k + 1],
                                       None if valid is None else valid[k : k + 1], n_bg, seed)
                 for k in range(feats.shape[0])]
        bg = torch.cat([p[0] for p in parts])
        bg_valid = torch.cat([p[1] for p in parts])
    else:
        bg, bg_valid, _ = background_prototypes(feats, fg_frac, valid, n_bg, seed)
    return Prototypes(fg[None], fg_valid.reshape(1), bg[None], bg_valid[None])


# --------------------------------------------------------------------------------------------------------------
# Eq. 3 and the Eq. 6 assignment
# --------------------------------------------------------------------------------------------------------------
def similarity_maps(feats: torch.Tensor, protos: Prototypes) -> Tuple[torch.Tensor, torch.Tensor]:
    """Cosine similarities: feats B x C x h x w -> (fg B x h x w, bg B x N_b x h x w with -inf for invalid)."""
    f = F.normalize(feats, dim=1)
    fg = torch.einsum("bchw,bc->bhw", f, F.normalize(protos.fg, dim=-1))
    bg = torch.einsum("bchw,bnc->bnhw", f, F.normalize(protos.bg, dim=-1))
    bg = bg.masked_fill(~protos.bg_valid[:, :, None, None], float("-inf"))
    return fg, bg


def margin_map(
    fg_sim: torch.Tensor, bg_sim: torch.Tensor, valid: Optional[torch.Tensor] = None
) -> torch.Tensor:
    """B x h x w: fg similarity minus the largest valid bg similarity (Eq. 3's decision value).

    Where an image has no valid bg prototype, its fg similarity minus the mean fg similarity over its valid
    cells. Padding cells (``valid`` False) get -1 (never foreground).
    """
    best_bg = bg_sim.max(dim=1).values if bg_sim.shape[1] else torch.full_like(fg_sim, float("-inf"))
    if valid is None:
        valid = torch.ones_like(fg_sim, dtype=torch.bool)
    valid = valid.to(torch.bool).expand_as(fg_sim)
    n_valid = valid.sum(dim=(1, 2)).clamp_min(1)
    mean_fg = (fg_sim * valid).sum(dim=(1, 2)) / n_valid
    no_bg = torch.isinf(best_bg)
    ref = torch.where(no_bg, mean_fg[:, None, None].expand_as(fg_sim), best_bg)
    return torch.where(valid, fg_sim - ref, torch.full_like(fg_sim, -1.0))


def pseudo_mask(
    feats: torch.Tensor, protos: Prototypes, valid: Optional[torch.Tensor] = None
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Eq. 3. Returns ``(mask B x h x w bool, margin B x h x w, assignment B x h x w long)`` (see module doc)."""
    fg_sim, bg_sim = similarity_maps(feats, protos)
    margin = margin_map(fg_sim, bg_sim, valid)
    mask = margin > 0
    n_bg = bg_sim.shape[1]
    if n_bg:
        best_bg = bg_sim.argmax(dim=1) + 1
        # an image without valid bg prototypes: bg cells get the "no prototype" row
        no_bg = ~protos.bg_valid.any(dim=1)
        best_bg = torch.where(no_bg[:, None, None], torch.full_like(best_bg, n_bg + 1), best_bg)
    else:
        best_bg = torch.full_like(mask, 1, dtype=torch.long)
    assign = torch.where(mask, torch.zeros_like(best_bg), best_bg)
    if valid is not None:
        assign = torch.where(valid.to(torch.bool).expand_as(assign), assign, torch.full_like(assign, n_bg + 1))
    return mask, margin, assign


# --------------------------------------------------------------------------------------------------------------
# negative examples ("not this class" regions, e.g. result polygons an analyst marked as wrong)
# --------------------------------------------------------------------------------------------------------------
def negative_prototypes(feats: torch.Tensor, fracs: torch.Tensor, valid: Optional[torch.Tensor] = None
                        ) -> Tuple[torch.Tensor, torch.Tensor]:
    """One prototype per negative region: masked average pooling (Eq. 1's foreground pooling) of the region's
    plain embedding. feats R x C x h x w (the embedding of the crop each region lies in, repeated per region),
    fracs R x h x w (the fraction of each cell the region covers), valid R x h x w or None
    -> ``(protos R x C, proto_valid R bool)`` (a region covering no valid cell: a zero row, invalid)."""
    w = fracs.to(feats.dtype)
    if valid is not None:
        w = w * valid.to(feats.dtype)
    total = w.sum(dim=(1, 2))
    pooled = torch.einsum("rchw,rhw->rc", feats, w) / total.clamp_min(1e-12)[:, None]
    ok = total > 0
    return torch.where(ok[:, None], pooled, torch.zeros_like(pooled)), ok


def with_negatives(protos: Prototypes, neg: torch.Tensor, neg_valid: torch.Tensor) -> Prototypes:
    """``protos`` (batch 1) with the negative prototypes ``neg`` (R x C, valid R) appended beside the Voronoi
    background rows: ``bg`` 1 x (N_b + R) x C. Eq. 3 (pseudo-mask), Eq. 6 (DTA assignment), VCP and the
    training-free candidate filter all take the largest similarity over the background rows, so a target region
    more like a negative example than like the class is background everywhere."""
    if neg.shape[0] == 0:
        return protos
    neg = neg.to(device=protos.bg.device, dtype=protos.bg.dtype)[None]
    return Prototypes(protos.fg, protos.fg_valid, torch.cat([protos.bg, neg], dim=1),
                      torch.cat([protos.bg_valid, neg_valid.to(protos.bg_valid.device)[None]], dim=1))


def negative_cells(feats: torch.Tensor, protos: Prototypes, n_neg: int,
                   valid: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Which embedding cells look like a negative example: feats B x C x h x w (plain embedding), ``protos`` of
    batch 1 or B whose last ``n_neg`` background rows are negatives (:func:`with_negatives`) -> B x h x w bool,
    the valid cells more similar to a valid negative prototype than to the foreground prototype (the cell-level
    form of :func:`negative_components`)."""
    b, _, h, w = feats.shape
    out = torch.zeros(b, h, w, dtype=torch.bool, device=feats.device)
    if n_neg <= 0:
        return out
    protos = protos.expand(b).to(device=feats.device, dtype=feats.dtype)
    f = F.normalize(feats, dim=1)
    fg_sim = torch.einsum("bchw,bc->bhw", f, F.normalize(protos.fg, dim=-1))
    neg = F.normalize(protos.bg[:, -n_neg:], dim=-1)
    neg_sim = torch.einsum("bchw,bnc->bnhw", f, neg).masked_fill(~protos.bg_valid[:, -n_neg:, None, None],
                                                                 float("-inf"))
    out = neg_sim.max(dim=1).values > fg_sim
    if valid is not None:
        out = out & valid.to(torch.bool).expand_as(out)
    return out


def negative_components(feats: torch.Tensor, low: torch.Tensor, protos: Prototypes, n_neg: int,
                        valid: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Which parts of a predicted mask look like a negative example: feats 1 x C x h x w (plain embedding),
    low 1 x 1 x H x W logits, ``protos`` whose last ``n_neg`` background rows are negatives
    (:func:`with_negatives`) -> H x W bool, the 8-connected components of ``low > 0`` whose mean embedding is
    more similar to a valid negative prototype than to the foreground prototype (the training-free mode's
    candidate filter, applied to the trained model's output against the negatives only)."""
    import numpy as np
    from scipy import ndimage

    out = torch.zeros(low.shape[-2:], dtype=torch.bool)
    if n_neg <= 0:
        return out
    neg_valid = protos.bg_valid[0, -n_neg:]
    fg_mask = (low[0, 0] > 0).cpu().numpy()
    if not bool(neg_valid.any()) or not fg_mask.any():
        return out
    labels, n = ndimage.label(fg_mask, structure=np.ones((3, 3), bool))
    lab = torch.from_numpy(labels).to(feats.device)
    h, w = feats.shape[-2:]
    onehot = (lab[None] == torch.arange(1, n + 1, device=feats.device)[:, None, None]).to(feats.dtype)
    cover = F.adaptive_avg_pool2d(onehot[:, None], (h, w))[:, 0]  # n x h x w
    if valid is not None:
        cover = cover * valid.reshape(1, h, w).to(feats.dtype)
    wsum = cover.sum(dim=(1, 2))
    mean = F.normalize(torch.einsum("chw,nhw->nc", feats[0], cover) / wsum.clamp_min(1e-6)[:, None], dim=-1)
    fg_sim = mean @ F.normalize(protos.fg[0].to(feats.dtype), dim=-1)
    neg = F.normalize(protos.bg[0, -n_neg:][neg_valid].to(feats.dtype), dim=-1)
    neg_sim = (mean @ neg.t()).max(dim=1).values
    drop = ((neg_sim > fg_sim) & (wsum > 0)).cpu()
    if bool(drop.any()):
        out = torch.from_numpy(np.isin(labels, (torch.nonzero(drop)[:, 0] + 1).numpy()))
    return out
