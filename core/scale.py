"""The working scale of a run, chosen from the marked objects' size, and the reference crops at that scale.

One rule for the pipeline, the eval command and the dock:

* **zoom** = working pixels per native pixel of the reference raster (1 = native resolution, 0.5 = half, 2 =
  twice upsampled). Target tiles are resampled to the same ground resolution, so objects look as large to the
  model in the targets as in the references.
* ``auto``: from the marked objects' median size (``sqrt(area)`` of each connected object, in native pixels):
  objects up to :data:`LARGE_OBJECT_PX` are worked on at the raster's own resolution; larger ones are brought
  down to that size, so that an object and its surroundings fit in SAM's 1024-pixel input. Clamped to
  [:data:`MIN_ZOOM`, :data:`MAX_ZOOM`] and snapped to 1 within :data:`SNAP` (rasters are then read as they are).
  Measured (``resources/adapters/MODEL_CARD.md``, "Working scale"): on buildings of unseen places and on the
  NWPU novel classes, objects of 20-130 pixels scored best at their native resolution: half of it cost 1.4
  (buildings) and 3.5 (NWPU) mIoU points, 1.5x cost 0.6 (buildings) and twice 11.7 (NWPU).
* The crops: marks far apart never make one large downsampled crop. The objects are grouped into clusters
  whose extent (plus ``margin`` of context) fits in one ``crop_size`` crop at the working zoom
  (:func:`plan_crops`); each cluster is one crop, one shot of the K-shot reference set.

* Zoomed views (:func:`zoom_view`, :data:`ZOOM_VIEWS`): a one-crop reference also seen zoomed out and in, as two
  more shots of the trained mode's K-shot ensemble (``RunParams.zoom_views``). Objects of a class vary in size
  within and across scenes; the views let one reference match them at 0.7x and 1.4x too.

Everything here is plain numpy on pixel boxes and arrays, without a raster or a model, so it is tested on its own.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

import numpy as np

LARGE_OBJECT_PX = 384.0  # objects larger than this (median sqrt of area, native px) are brought down to it
MIN_ZOOM, MAX_ZOOM = 0.125, 4.0
SNAP = 0.15  # |zoom - 1| within this: native resolution (no resampling of rasters from the same source)
MAX_CROPS = 8  # more clusters than this: the ones with the most marked area are kept
# zoomed views of a one-crop reference (RunParams.zoom_views): zoomed out, zoomed in. Three NWPU folds, three
# cheap-recipe fold adapter files, 1-shot: +1.2 mIoU on average (resources/adapters/MODEL_CARD.md, "Zoomed views");
# 0.5x / 2x lost
ZOOM_VIEWS = (0.7, 1.4)

Box = Tuple[float, float, float, float]  # x0, y0, x1, y1 in native pixels


def parse_scale(value) -> Optional[float]:
    """``"auto"`` / None / "" -> None (auto); a number (or its text) > 0 -> that zoom. ValueError otherwise."""
    if value is None:
        return None
    if isinstance(value, str):
        v = value.strip().lower()
        if v in ("", "auto"):
            return None
        value = v[:-1] if v.endswith("x") else v
    z = float(value)
    if not (z > 0 and math.isfinite(z)):
        raise ValueError(f"scale must be 'auto' or a positive number, got {value!r}")
    return z


def object_sizes(mask: np.ndarray) -> np.ndarray:
    """``sqrt(area)`` in pixels of each 8-connected object of a bool mask (empty array for an empty mask)."""
    from scipy import ndimage

    m = np.asarray(mask, bool)
    if not m.any():
        return np.zeros(0, np.float64)
    labels, n = ndimage.label(m, structure=np.ones((3, 3), bool))
    areas = np.bincount(labels.ravel(), minlength=n + 1)[1:]
    return np.sqrt(areas.astype(np.float64))


def smallest_object_area(masks: Sequence[np.ndarray]) -> float:
    """Area in pixels of the smallest 8-connected marked object over the masks (0.0 when nothing is marked): what
    ``RunParams.min_object_share`` is a share of."""
    sizes = [object_sizes(m) for m in masks]
    sizes = [s for s in sizes if s.size]
    return float(min(s.min() for s in sizes) ** 2) if sizes else 0.0


def object_boxes(mask: np.ndarray) -> List[Box]:
    """Pixel boxes (x0, y0, x1, y1; x1/y1 exclusive) of the 8-connected objects of a bool mask."""
    from scipy import ndimage

    m = np.asarray(mask, bool)
    labels, _ = ndimage.label(m, structure=np.ones((3, 3), bool))
    return [(s[1].start, s[0].start, s[1].stop, s[0].stop) for s in ndimage.find_objects(labels) if s is not None]


def auto_zoom(sizes: Sequence[float], large: float = LARGE_OBJECT_PX) -> float:
    """The zoom for objects of ``sizes`` (native pixels): 1, or what brings their median down to ``large``."""
    s = np.asarray([v for v in sizes if v > 0], np.float64)
    if s.size == 0:
        return 1.0
    z = float(np.clip(min(1.0, large / float(np.median(s))), MIN_ZOOM, MAX_ZOOM))
    return 1.0 if abs(z - 1.0) <= SNAP else z


@dataclass(frozen=True)
class ScaleChoice:
    """The working zoom and why: ``zoom``, ``auto`` (chosen by the rule) and the median object size (native px)."""

    zoom: float
    auto: bool
    median_object_px: float

    def describe(self) -> str:
        how = "auto" if self.auto else "set"
        size = (f", marked objects ~{self.median_object_px:.0f} px native, "
                f"~{self.median_object_px * self.zoom:.0f} px at work") if self.median_object_px > 0 else ""
        return f"working scale {self.zoom:.2f}x native ({how}{size})"


def choose(sizes: Sequence[float], scale=None) -> ScaleChoice:
    """``scale`` None/"auto" -> :func:`auto_zoom` of ``sizes``; a number -> that zoom."""
    s = np.asarray([v for v in sizes if v > 0], np.float64)
    med = float(np.median(s)) if s.size else 0.0
    z = parse_scale(scale)
    if z is None:
        return ScaleChoice(auto_zoom(s), True, med)
    return ScaleChoice(z, False, med)


def plan_crops(boxes: Sequence[Box], zoom: float, width: int, height: int, crop_size: int = 1024,
               margin: int = 32, weights: Optional[Sequence[float]] = None,
               max_crops: int = MAX_CROPS) -> List[Tuple[int, int, int, int]]:
    """Crops (col_off, row_off, width, height in native pixels) covering the objects at ``zoom``.

    Objects are grouped greedily (largest first) into clusters whose extent plus ``margin`` working pixels of
    context fits in ``crop_size`` working pixels; an object larger than a crop gets a crop of its own centred on
    it (what does not fit is cut: the model sees that much of it). Each crop is a square of ``crop_size / zoom``
    native pixels centred on its cluster and shifted to stay inside the raster (a raster smaller than that gives
    the whole raster). At most ``max_crops`` crops: the clusters with the most ``weights`` (default: box area).
    """
    side = max(1, int(round(crop_size / zoom)))
    room = side - 2 * margin / zoom
    if not boxes:
        return []
    w = np.asarray(weights if weights is not None else [(b[2] - b[0]) * (b[3] - b[1]) for b in boxes], float)
    order = np.argsort(-w, kind="stable")
    clusters: List[List[float]] = []  # [x0, y0, x1, y1, weight]
    for i in order:
        x0, y0, x1, y1 = boxes[i]
        for c in clusters:
            u = (min(c[0], x0), min(c[1], y0), max(c[2], x1), max(c[3], y1))
            if max(u[2] - u[0], u[3] - u[1]) <= room:
                c[:4] = u
                c[4] += w[i]
                break
        else:
            clusters.append([x0, y0, x1, y1, w[i]])
    clusters.sort(key=lambda c: -c[4])
    out = []
    for x0, y0, x1, y1, _ in clusters[:max_crops]:
        out.append(_place((x0 + x1) / 2.0, width, side) + _place((y0 + y1) / 2.0, height, side))
    return [(c0, r0, cw, rh) for c0, cw, r0, rh in out]


def _place(center: float, length: int, side: int) -> Tuple[int, int]:
    size = min(side, length)
    start = int(round(center - size / 2.0))
    return min(max(0, start), length - size), size


def zoom_view(image: np.ndarray, mask: np.ndarray, zoom: float) -> Optional[Tuple[np.ndarray, np.ndarray]]:
    """The reference ``image`` (H x W [x C]) and its ``mask`` (H x W bool) as SAM sees them ``zoom`` times larger,
    since SAM resizes every input to its own size: zoom < 1 mirrors the image outwards to (H / zoom, W / zoom)
    around its centre (the marks mirrored with it: what was marked stays marked in every copy); zoom > 1 keeps an
    (H / zoom, W / zoom) window centred on the marks' centre of mass, shifted to stay inside. None when the view
    keeps no marked pixel (or zoom is 1)."""
    mask = np.asarray(mask, dtype=bool)
    h, w = mask.shape
    if zoom <= 0 or zoom == 1 or not mask.any():
        return None
    if zoom < 1:
        ph, pw = int(round(h / zoom)) - h, int(round(w / zoom)) - w
        pad = ((ph // 2, ph - ph // 2), (pw // 2, pw - pw // 2))
        img = np.pad(image, pad + ((0, 0),) * (image.ndim - 2), mode="symmetric")
        return np.ascontiguousarray(img), np.pad(mask, pad, mode="symmetric")
    ch, cw = max(1, int(round(h / zoom))), max(1, int(round(w / zoom)))
    ys, xs = np.nonzero(mask)
    y0 = min(max(0, int(ys.mean()) - ch // 2), h - ch)
    x0 = min(max(0, int(xs.mean()) - cw // 2), w - cw)
    m = mask[y0 : y0 + ch, x0 : x0 + cw]
    if not m.any():
        return None
    return np.ascontiguousarray(image[y0 : y0 + ch, x0 : x0 + cw]), np.ascontiguousarray(m)
