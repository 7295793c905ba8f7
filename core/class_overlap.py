"""Several classes without overlap (``RunParams.allow_overlap`` off): the more probable class keeps each pixel
(:func:`keep_most_probable`, on the probability maps), and a polygon holding another class's polygons gets those
holes back (:func:`cut_enclosed`, on the features)."""

from __future__ import annotations

from typing import List

import numpy as np

from .results import Feature


def keep_most_probable(maps: List[np.ndarray], block_rows: int = 512) -> None:
    """Several classes' probability maps (H x W each, changed in place): where classes overlap, each pixel keeps
    only the most probable class's probability (the others get 0; ties go to the first class)."""
    h = maps[0].shape[0]
    for r in range(0, h, block_rows):
        stack = np.stack([np.asarray(m[r : r + block_rows]) for m in maps])
        best = stack.argmax(axis=0)
        for k, m in enumerate(maps):
            m[r : r + block_rows] = np.where(best == k, stack[k], 0.0).astype(m.dtype)


def cut_enclosed(per_class: List[List[Feature]]) -> None:
    """Several classes without overlap: a polygon whose filled holes hold another class's polygons gets those
    holes back (in place; ``area`` scaled to the new geometry). Only polygons of other classes whose
    representative point lies inside it and which are smaller are cut out."""
    from shapely.ops import unary_union

    flat = [(k, f) for k, feats in enumerate(per_class) for f in feats]
    geoms = [f.geometry for _, f in flat]
    if not geoms:
        return
    b = np.asarray([g.bounds for g in geoms], np.float64)  # boxes first (shapely 1.8's STRtree can crash here)
    for k, f in flat:
        g = f.geometry
        x0, y0, x1, y1 = g.bounds
        near = np.nonzero((b[:, 0] <= x1) & (b[:, 2] >= x0) & (b[:, 1] <= y1) & (b[:, 3] >= y0))[0]
        inner = [geoms[j] for j in near if flat[j][0] != k and geoms[j].area < g.area
                 and g.contains(geoms[j].representative_point())]
        if inner:
            cut = g.difference(unary_union(inner))
            if not cut.is_empty and cut.area > 0:
                f.attributes["area"] = f.attributes.get("area", 0.0) * cut.area / g.area
                f.geometry = cut
