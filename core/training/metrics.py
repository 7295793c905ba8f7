"""The standard few-shot segmentation metrics (PANet / HSNet protocol).

For every novel class, the intersection and the union of the predicted and true foreground are summed over
all of that class's episodes; the class IoU is the ratio of the sums, and **mIoU** is the mean of the class
IoUs (a class with many episodes does not weigh more). **FB-IoU** is the mean of the foreground IoU and the
background IoU, each a ratio of sums accumulated over all episodes of all classes. Pixels marked *ignore*
count in neither. Per-episode IoUs are kept too, as a diagnostic (their mean is *not* the protocol's mIoU).
So are each class's pixel **precision** and **recall** (sums over its episodes, like its IoU): they tell a
model that marks too much (other objects taken for the class) from one that misses objects.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Dict, Hashable, List, Optional

import numpy as np


def _as_bool(a) -> np.ndarray:
    try:
        import torch

        if isinstance(a, torch.Tensor):
            a = a.detach().cpu().numpy()
    except ImportError:  # pragma: no cover
        pass
    return np.asarray(a).astype(bool, copy=False)


def _kept(pred, gt, ignore):
    pred, gt = _as_bool(pred), _as_bool(gt)
    if pred.shape != gt.shape:
        raise ValueError(f"prediction {pred.shape} and ground truth {gt.shape} differ in shape")
    if ignore is not None:
        keep = ~_as_bool(ignore)
        pred, gt = pred[keep], gt[keep]
    return pred, gt


def intersection_union(pred, gt, ignore=None):
    """``((I_bg, U_bg), (I_fg, U_fg))`` pixel counts of one prediction (bool arrays of the same shape)."""
    pred, gt = _kept(pred, gt, ignore)
    i_fg = int(np.count_nonzero(pred & gt))
    u_fg = int(np.count_nonzero(pred | gt))
    i_bg = int(np.count_nonzero(~pred & ~gt))
    u_bg = int(np.count_nonzero(~pred | ~gt))
    return (i_bg, u_bg), (i_fg, u_fg)


@dataclass
class _ClassAcc:
    i_fg: int = 0
    u_fg: int = 0
    i_bg: int = 0
    u_bg: int = 0
    episodes: int = 0
    pred_px: Optional[int] = 0  # predicted foreground pixels; None once an episode came without them
    episode_ious: List[float] = field(default_factory=list)


class FewShotMeter:
    """Accumulates episodes and computes the protocol's mIoU and FB-IoU (percentages)."""

    def __init__(self) -> None:
        self._acc: "OrderedDict[Hashable, _ClassAcc]" = OrderedDict()

    def update(self, class_key: Hashable, pred, gt, ignore=None) -> float:
        """Add one episode; returns that episode's foreground IoU in % (100 when both masks are empty)."""
        pred, gt = _kept(pred, gt, ignore)
        (i_bg, u_bg), (i_fg, u_fg) = intersection_union(pred, gt)
        return self.add_counts(class_key, i_fg, u_fg, i_bg, u_bg, pred_px=int(np.count_nonzero(pred)))

    def add_counts(self, class_key: Hashable, i_fg: int, u_fg: int, i_bg: int, u_bg: int,
                   pred_px: Optional[int] = None) -> float:
        """Add one episode from its pixel counts (e.g. stored by an interrupted run); returns its fg IoU in %.
        Without ``pred_px`` (predicted foreground pixels) the class has no precision and recall."""
        acc = self._acc.setdefault(class_key, _ClassAcc())
        acc.pred_px = None if pred_px is None or acc.pred_px is None else acc.pred_px + int(pred_px)
        acc.i_fg += i_fg
        acc.u_fg += u_fg
        acc.i_bg += i_bg
        acc.u_bg += u_bg
        acc.episodes += 1
        iou = 100.0 * i_fg / u_fg if u_fg else 100.0
        acc.episode_ious.append(iou)
        return iou

    @property
    def classes(self) -> List[Hashable]:
        return list(self._acc)

    @property
    def episodes(self) -> int:
        return sum(a.episodes for a in self._acc.values())

    def class_iou(self) -> Dict[Hashable, float]:
        """Foreground IoU (%) of each class: sum of intersections / sum of unions over its episodes."""
        return {k: (100.0 * a.i_fg / a.u_fg if a.u_fg else float("nan")) for k, a in self._acc.items()}

    def miou(self) -> float:
        vals = [v for v in self.class_iou().values() if v == v]
        return float(np.mean(vals)) if vals else float("nan")

    def fbiou(self) -> float:
        i_fg = sum(a.i_fg for a in self._acc.values())
        u_fg = sum(a.u_fg for a in self._acc.values())
        i_bg = sum(a.i_bg for a in self._acc.values())
        u_bg = sum(a.u_bg for a in self._acc.values())
        if not (u_fg or u_bg):
            return float("nan")
        fg = i_fg / u_fg if u_fg else 1.0
        bg = i_bg / u_bg if u_bg else 1.0
        return 100.0 * (fg + bg) / 2.0

    def class_precision_recall(self) -> Dict[Hashable, tuple]:
        """Pixel precision and recall (%) of each class over its episodes; (None, None) where unknown
        (episodes added without ``pred_px``) and None where undefined (nothing predicted / nothing to find)."""
        out = {}
        for k, a in self._acc.items():
            if a.pred_px is None:
                out[k] = (None, None)
                continue
            gt_px = a.u_fg + a.i_fg - a.pred_px  # |P| + |G| = |P u G| + |P n G|
            out[k] = (100.0 * a.i_fg / a.pred_px if a.pred_px else None, 100.0 * a.i_fg / gt_px if gt_px else None)
        return out

    def class_fbiou(self) -> Dict[Hashable, float]:
        """FB-IoU restricted to one class's episodes (a diagnostic)."""
        out = {}
        for k, a in self._acc.items():
            fg = a.i_fg / a.u_fg if a.u_fg else 1.0
            bg = a.i_bg / a.u_bg if a.u_bg else 1.0
            out[k] = 100.0 * (fg + bg) / 2.0
        return out

    def summary(self) -> dict:
        """A JSON-ready dict: mIoU, FB-IoU, episodes, and per class IoU, FB-IoU, precision, recall, episodes,
        mean episode IoU."""
        ious, fbs, prs = self.class_iou(), self.class_fbiou(), self.class_precision_recall()
        per_class = OrderedDict()
        for k, a in self._acc.items():
            prec, rec = (None if v is None else round(v, 3) for v in prs[k])
            per_class[str(k)] = {
                "iou": round(ious[k], 3), "fbiou": round(fbs[k], 3), "precision": prec, "recall": rec,
                "episodes": a.episodes,
                "mean_episode_iou": round(float(np.mean(a.episode_ious)), 3) if a.episode_ious else None,
                "intersection": a.i_fg, "union": a.u_fg,
            }
        return {"miou": round(self.miou(), 3), "fbiou": round(self.fbiou(), 3), "episodes": self.episodes,
                "classes": per_class}

    def merge(self, other: "FewShotMeter") -> "FewShotMeter":
        for k, b in other._acc.items():
            a = self._acc.setdefault(k, _ClassAcc())
            a.i_fg += b.i_fg
            a.u_fg += b.u_fg
            a.i_bg += b.i_bg
            a.u_bg += b.u_bg
            a.episodes += b.episodes
            a.pred_px = None if a.pred_px is None or b.pred_px is None else a.pred_px + b.pred_px
            a.episode_ious.extend(b.episode_ious)
        return self


def format_table(rows: Dict[str, "FewShotMeter"], title: Optional[str] = None) -> str:
    """A plain-text table: one row per meter (e.g. per mode), one column per class, then mIoU and FB-IoU."""
    classes: List[Hashable] = []
    for m in rows.values():
        for k in m.classes:
            if k not in classes:
                classes.append(k)
    names = [str(c) for c in classes]
    w0 = max([len(r) for r in rows] + [6])
    widths = [max(len(n), 6) for n in names]
    head = "  ".join([" " * w0] + [n.rjust(w) for n, w in zip(names, widths)] + ["  mIoU", "FB-IoU", "  eps"])
    lines = [title] if title else []
    lines += [head, "-" * len(head)]
    for r, m in rows.items():
        ious = m.class_iou()
        cells = [(f"{ious[c]:.1f}" if c in ious else "-").rjust(w) for c, w in zip(classes, widths)]
        lines.append("  ".join([r.ljust(w0)] + cells + [f"{m.miou():6.1f}", f"{m.fbiou():6.1f}",
                                                          f"{m.episodes:5d}"]))
    return "\n".join(lines)
