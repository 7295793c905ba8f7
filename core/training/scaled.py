"""The pipeline's working-scale rule for in-memory episodes (``python -m core eval --scale``).

The pipeline reads rasters; an evaluation episode holds arrays. Both follow :mod:`core.scale`:

* the references become one crop per cluster of objects at the working zoom (:func:`reference_shots`), never
  one downsampled image;
* the query is resampled by the same zoom and predicted tile by tile (1024-pixel tiles, 128 pixels of overlap,
  blended as the pipeline blends them), and the probability map resampled back to the query's size
  (:func:`predict_at_zoom`).

``zoom`` is working pixels per image pixel. ``--scale none`` keeps the older protocol (whole images, which SAM
shrinks or enlarges to 1024 on their longest side).
"""

from __future__ import annotations

from typing import List, Sequence, Tuple

import numpy as np

from ..scale import ScaleChoice, choose, object_boxes, object_sizes, plan_crops
from ..tiling import ProbabilityStitcher, TileGrid, resize_nearest


def resample_rgb(image: np.ndarray, shape: Tuple[int, int]) -> np.ndarray:
    """H x W x 3 uint8 -> shape (rows, cols) x 3 uint8 (bilinear, antialiased when shrinking)."""
    if image.shape[:2] == tuple(shape):
        return image
    import torch
    import torch.nn.functional as F

    t = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1)[None].float()
    shrink = shape[0] < image.shape[0] or shape[1] < image.shape[1]
    t = F.interpolate(t, size=tuple(int(v) for v in shape), mode="bilinear", align_corners=False, antialias=shrink)
    return t[0].permute(1, 2, 0).round().clamp(0, 255).to(torch.uint8).numpy()


def zoom_for(masks: Sequence[np.ndarray], scale) -> ScaleChoice:
    """The :class:`core.scale.ScaleChoice` for reference masks (``scale``: "auto" or a zoom)."""
    sizes = np.concatenate([object_sizes(m) for m in masks]) if masks else np.zeros(0)
    return choose(sizes, scale)


def reference_shots(images: Sequence[np.ndarray], masks: Sequence[np.ndarray], zoom: float,
                    crop_size: int = 1024, margin: int = 32) -> List[Tuple[np.ndarray, np.ndarray]]:
    """K references -> shots (image, mask) at ``zoom``: one crop per cluster of objects (:func:`plan_crops`)."""
    shots = []
    for img, m in zip(images, masks):
        m = np.asarray(m, bool)
        h, w = m.shape
        crops = plan_crops(object_boxes(m), zoom, w, h, crop_size, margin)
        for c0, r0, cw, rh in crops:
            out = (max(2, int(round(rh * zoom))), max(2, int(round(cw * zoom))))
            ci = resample_rgb(img[r0 : r0 + rh, c0 : c0 + cw], out)
            cm = resize_nearest(m[r0 : r0 + rh, c0 : c0 + cw], out)
            if cm.any():
                shots.append((ci, cm))
    return shots


def predict_at_zoom(predict, image: np.ndarray, zoom: float, tile_size: int = 1024,
                    overlap: int = 128) -> np.ndarray:
    """``predict(tile) -> prob`` over ``image`` resampled by ``zoom``, tiled and blended; -> H x W float32."""
    h, w = image.shape[:2]
    grid = TileGrid(w, h, tile_size, overlap, scale=1.0 / zoom)
    if len(grid) == 1 and grid[0].out_shape == (h, w):
        return predict(image)
    with ProbabilityStitcher(w, h, feather=grid.feather) as st:
        for t in grid:
            win = t.window
            c0, r0, cw, rh = int(win.col_off), int(win.row_off), int(win.width), int(win.height)
            tile = resample_rgb(image[r0 : r0 + rh, c0 : c0 + cw], t.out_shape)
            st.add(win, predict(tile))
        return np.array(st.finalize())


__all__ = ["reference_shots", "predict_at_zoom", "zoom_for", "resample_rgb"]
