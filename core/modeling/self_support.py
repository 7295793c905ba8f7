"""Self-support prototypes: the target's own confident objects as a second reference (transductive step).

A reference drawn in one scene describes the class as it looks there; the targets may differ (another city's
roofs, another sensor). After the first decoding of a target, the cells it holds confidently become prototypes
of the target itself, in the manner of self-support matching (Fan et al., ECCV 2022, "Self-Support Matching for
Few-Shot Segmentation"): the foreground prototype is the mean of the reference's and the target's confident
foreground, and the target's confident background adds ``N_b`` Voronoi background prototypes (Eq. 1) beside the
reference's. :meth:`.virefsam.ViRefSAM.self_support` then runs Eqs. 2-4 and the decoder once more with them, on
the same adapted embedding (no encoder pass); that decoding is the result (the first one only says where the
target's confident objects are).

Opt-in (``RunParams.self_support``): with "Not <class>" corrections some marked places came back (model card; 2 of
5 on the Kampala corrections window in session 20, 1 of 5 since session 21 leaves the cells more like a negative
example out of the target's foreground, ``exclude``, and filters the objects it adds: the predictor's
``_with_self_support``).
Measured (session 20, shipped adapters; ``resources/adapters/self_support/``): the same places as the reference
gain nothing (NWPU fold 0 novel classes 22.4 -> 22.2 mIoU, OpenAerialMap collages 56.5 -> 56.3); another city
does (six 3-house reference picks in Zanzibar, Kampala target: IoU 0.539 +- 0.028 -> 0.580 +- 0.013; Zanzibar
target 0.706 -> 0.707). One more decoding per tile. The thresholds below and the 1:1 foreground fusion are
SSP's choices, not tuned here; only the weight of the second decoding was (1 against 0.5: Kampala 0.525 against
0.506 in ``make demo``, the benchmarks alike).
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from .prototypes import Prototypes, build_prototypes

FG_CONFIDENT = 0.7  # a cell whose mean probability in the first decoding is at least this is target foreground
BG_CONFIDENT = 0.3  # ... at most this: target background; cells between the two are left out of both


def cell_probability(low: torch.Tensor, grid: int) -> torch.Tensor:
    """low B x 1 x 4g x 4g logits (SAM's low-res masks) -> B x g x g mean probability per embedding cell."""
    prob = torch.sigmoid(low[:, :1].float())
    return F.adaptive_avg_pool2d(prob, grid)[:, 0]


def self_support_prototypes(
    plain: torch.Tensor, low: torch.Tensor, protos: Prototypes, valid: Optional[torch.Tensor], n_bg: int,
    seed: int = 0, exclude: Optional[torch.Tensor] = None,
) -> Prototypes:
    """The reference prototypes fused with the target's own (see module doc).

    plain B x C x g x g (the target's frozen embedding); low B x 1 x 4g x 4g (the first decoding's logits);
    protos :class:`Prototypes` of batch B (the reference's, on plain's device); valid B x g x g bool or None
    -> :class:`Prototypes` of batch B with ``N_b + n_bg`` background rows (the reference's first). A target
    without a confident foreground cell keeps the reference's foreground prototype. ``exclude`` B x g x g bool or
    None: cells never taken as the target's foreground (those more like an analyst's negative example).
    """
    b, _, g, _ = plain.shape
    cell = cell_probability(low, g).to(plain.dtype)
    ok = torch.ones_like(cell, dtype=torch.bool) if valid is None else valid.to(torch.bool).expand_as(cell)
    fg_cells = cell >= FG_CONFIDENT
    if exclude is not None:
        fg_cells = fg_cells & ~exclude.to(torch.bool).expand_as(fg_cells)
    sure = ok & (fg_cells | (cell <= BG_CONFIDENT))
    fgs, bgs, bg_oks = [], [], []
    for i in range(b):
        own = build_prototypes(plain[i : i + 1], fg_cells[i : i + 1].to(plain.dtype), sure[i : i + 1], n_bg, seed)
        ref_fg = protos.fg[i]
        fgs.append(torch.where(own.fg_valid[0], 0.5 * (ref_fg + own.fg[0]), ref_fg))
        bgs.append(torch.cat([protos.bg[i], own.bg[0]]))
        bg_oks.append(torch.cat([protos.bg_valid[i], own.bg_valid[0]]))
    return Prototypes(torch.stack(fgs), protos.fg_valid.clone(), torch.stack(bgs), torch.stack(bg_oks))
