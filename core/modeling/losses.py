"""ViRefSAM's segmentation loss (BCE + Dice on the decoder's low-resolution logits), shared by episodic training
(:mod:`core.training.train`) and run-time tuning on the references (:mod:`.tune`); L_reg comes from VCP."""

from __future__ import annotations

from typing import Tuple

import torch
import torch.nn.functional as F


def segmentation_loss(low: torch.Tensor, target: torch.Tensor, keep: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """(bce, dice) on low-res logits B x 1 x 256 x 256, soft targets B x 256 x 256, pixel weights B x 256 x 256."""
    low = low[:, 0].float()
    w = keep
    bce = (F.binary_cross_entropy_with_logits(low, target, reduction="none") * w).sum() / w.sum().clamp_min(1.0)
    p = torch.sigmoid(low) * w
    t = target * w
    inter = (p * t).sum(dim=(1, 2))
    dice = 1.0 - (2.0 * inter + 1.0) / (p.sum(dim=(1, 2)) + t.sum(dim=(1, 2)) + 1.0)
    return bce, dice.mean()
