"""Probability map -> polygons in the raster's CRS.

:func:`vectorize` thresholds the full-size map (an ``np.ndarray`` or the ``np.memmap`` of
``ProbabilityStitcher``) and polygonises it once, over the whole raster, with GDAL's polygonizer
(``rasterio.features.shapes``, 4-connectivity, pixel-corner convention): an object that straddles tile borders
is one polygon because tiles were blended into one map before this step.

Memory: maps up to ``IN_MEMORY_MAX_PIXELS`` are thresholded into a uint8 array (about 2 bytes per pixel with
GDAL's copy); larger ones are thresholded row block by row block into a temporary uint8 GeoTIFF that GDAL
polygonises scanline by scanline, so only the polygons themselves are held in memory. Scores are read back from
the map window by window.

Steps, all in pixel space (so tolerances and areas are in pixels whatever the CRS):
threshold (``prob >= threshold``) -> polygons -> holes: every hole filled when ``fill_holes``, otherwise only
holes smaller than ``min_area`` (objects inside a filled hole are merged into their parent) -> objects smaller
than ``min_area`` square pixels dropped -> score = mean probability over the (filled) polygon's pixels ->
simplification (Douglas-Peucker, topology preserving, tolerance ``simplify`` pixels) -> the raster's affine
transform to map coordinates -> area.

Area (:class:`AreaCalculator`): geographic CRS -> geodesic area on the CRS's ellipsoid (m2); Mercator-family
projected CRS (normal-aspect Mercator: Web Mercator, EPSG:3395 ...) -> geodesic area of the polygon taken back to
longitude/latitude (m2), because their planar area is inflated by 1 / cos^2(latitude); other projected CRS with a known linear unit -> planar area
times unit^2 (m2); a CRS with an unknown unit -> planar area ("map_units2"); no CRS -> pixel count ("px2").
"""

from __future__ import annotations

import os
import tempfile
import warnings
from dataclasses import dataclass
from typing import Callable, Iterable, List, Optional, Tuple

import numpy as np
import rasterio
from rasterio import Affine
from rasterio.errors import NotGeoreferencedWarning
from rasterio.features import rasterize, shapes
from shapely import affinity
from shapely.geometry import Polygon, shape

from .errors import CancelledError
from .results import Feature

IN_MEMORY_MAX_PIXELS = 8192 * 8192
BLOCK_ROWS = 1024
SCORE_BLOCK_PIXELS = 4096 * 1024  # largest piece of the map read at once for a score


@dataclass
class Detection:
    """One object: ``geometry`` a shapely Polygon in the raster's CRS, ``score`` the mean probability over its
    pixels, ``area`` in ``area_unit`` ("m2", "map_units2" or "px2"), ``pixels`` its area in pixels (holes filled,
    before simplification)."""

    geometry: Polygon
    score: float
    area: float
    area_unit: str
    pixels: float


class AreaCalculator:
    """``AreaCalculator(crs)(geometry_in_crs, pixel_area) -> area`` in ``self.unit``; see the module docstring."""

    def __init__(self, crs=None) -> None:
        self.unit = "px2"
        self._mode = "px"
        self._factor = 1.0
        self._geod = None
        self._to_lonlat = None
        if crs is None:
            return
        import pyproj

        try:
            pcrs = crs if isinstance(crs, pyproj.CRS) else pyproj.CRS.from_user_input(
                crs.to_wkt() if hasattr(crs, "to_wkt") else crs
            )
        except pyproj.exceptions.CRSError:
            self.unit, self._mode = "map_units2", "planar"
            return
        geod_crs = pcrs.geodetic_crs
        if pcrs.is_geographic and geod_crs is not None:
            self.unit, self._mode, self._geod = "m2", "geodesic", geod_crs.get_geod()
            self._to_lonlat = None
            return
        if pcrs.is_projected:
            method = ""
            try:
                method = (pcrs.coordinate_operation.method_name or "").lower()
            except Exception:  # noqa: BLE001
                pass
            normal_mercator = "mercator" in method and "transverse" not in method and "oblique" not in method
            if normal_mercator and geod_crs is not None:
                tr = pyproj.Transformer.from_crs(pcrs, geod_crs, always_xy=True)
                self.unit, self._mode, self._geod = "m2", "geodesic", geod_crs.get_geod()
                self._to_lonlat = tr
                return
            try:
                f = pcrs.axis_info[0].unit_conversion_factor
            except Exception:  # noqa: BLE001
                f = None
            if f:
                self.unit, self._mode, self._factor = "m2", "planar", float(f) ** 2
                return
        self.unit, self._mode = "map_units2", "planar"

    def __call__(self, geom, pixel_area: float = 0.0) -> float:
        if self._mode == "px":
            return float(pixel_area)
        if self._mode == "planar":
            return float(geom.area) * self._factor
        polys = list(geom.geoms) if hasattr(geom, "geoms") else [geom]
        total = 0.0
        for p in polys:
            total += self._ring_area(p.exterior) - sum(self._ring_area(r) for r in p.interiors)
        return abs(total)

    def _ring_area(self, ring) -> float:
        """Unsigned geodesic area enclosed by one ring (vectorised coordinate transform)."""
        xy = np.asarray(ring.coords, dtype=np.float64)
        x, y = xy[:, 0], xy[:, 1]
        if self._to_lonlat is not None:
            x, y = self._to_lonlat.transform(x, y)
        return abs(float(self._geod.polygon_area_perimeter(x, y)[0]))


def _signed_area(xy: np.ndarray) -> float:
    x, y = xy[:, 0], xy[:, 1]
    return 0.5 * float(np.dot(x[:-1], y[1:]) - np.dot(x[1:], y[:-1]))


def _orient_ccw(p: Polygon) -> Polygon:
    """The polygon with a counter-clockwise exterior and clockwise holes (the OGC / GeoJSON convention)."""
    ext = np.asarray(p.exterior.coords)
    holes = [np.asarray(r.coords) for r in p.interiors]
    ext_ok = _signed_area(ext) > 0
    holes_ok = [_signed_area(h) < 0 for h in holes]
    if ext_ok and all(holes_ok):
        return p
    return Polygon(ext if ext_ok else ext[::-1], [h if ok else h[::-1] for h, ok in zip(holes, holes_ok)])


def _threshold_blocks(prob, threshold: float) -> Iterable[Tuple[int, np.ndarray]]:
    h = prob.shape[0]
    for r in range(0, h, BLOCK_ROWS):
        block = np.asarray(prob[r : r + BLOCK_ROWS])
        yield r, (block >= threshold).astype(np.uint8)


def _pixel_polygons(prob, threshold: float, tmp_dir: Optional[str]) -> Iterable[Polygon]:
    """Polygons (pixel coordinates, x = column, y = row) of the 4-connected regions where prob >= threshold."""
    h, w = prob.shape
    if h * w <= IN_MEMORY_MAX_PIXELS:
        mask = np.empty((h, w), np.uint8)
        for r, m in _threshold_blocks(prob, threshold):
            mask[r : r + m.shape[0]] = m
        if not mask.any():
            return
        for geom, _ in shapes(mask, mask=mask.view(bool), connectivity=4, transform=Affine.identity()):
            yield shape(geom)
        return
    fd, path = tempfile.mkstemp(prefix="virefsam_mask_", suffix=".tif", dir=tmp_dir)
    os.close(fd)
    try:
        profile = dict(driver="GTiff", width=w, height=h, count=1, dtype="uint8", compress="deflate",
                       ZLEVEL=1, BIGTIFF="IF_SAFER", blockysize=16)
        any_fg = False
        with warnings.catch_warnings():  # pixel space on purpose: no georeferencing in the temporary file
            warnings.simplefilter("ignore", NotGeoreferencedWarning)
            dst = rasterio.open(path, "w", **profile)
        with dst:
            for r, m in _threshold_blocks(prob, threshold):
                any_fg = any_fg or bool(m.any())
                dst.write(m, 1, window=rasterio.windows.Window(0, r, w, m.shape[0]))
        if not any_fg:
            return
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", NotGeoreferencedWarning)
            ds = rasterio.open(path)
        with ds:
            band = rasterio.band(ds, 1)
            for geom, _ in shapes(band, mask=band, connectivity=4, transform=Affine.identity()):
                yield shape(geom)
    finally:
        try:
            os.remove(path)
        except OSError:  # pragma: no cover
            pass


def _mean_inside(prob, poly: Polygon) -> float:
    """Mean of ``prob`` over the pixels whose centre lies inside ``poly`` (pixel coordinates)."""
    minx, miny, maxx, maxy = poly.bounds
    c0, r0 = max(0, int(np.floor(minx))), max(0, int(np.floor(miny)))
    c1, r1 = min(prob.shape[1], int(np.ceil(maxx))), min(prob.shape[0], int(np.ceil(maxy)))
    if c1 <= c0 or r1 <= r0:
        return 0.0
    step = max(1, SCORE_BLOCK_PIXELS // (c1 - c0))
    total, count = 0.0, 0
    for ra in range(r0, r1, step):
        rb = min(r1, ra + step)
        m = rasterize([(poly, 1)], out_shape=(rb - ra, c1 - c0), transform=Affine.translation(c0, ra),
                      fill=0, dtype="uint8").view(bool)
        n = int(m.sum())
        if n:
            total += float(np.asarray(prob[ra:rb, c0:c1], dtype=np.float64)[m].sum())
            count += n
    if count == 0:  # thinner than a pixel centre everywhere: use the bounding box
        return float(np.asarray(prob[r0:r1, c0:c1], dtype=np.float64).mean())
    return total / count


def vectorize(
    prob,
    transform: Affine,
    crs=None,
    threshold: float = 0.5,
    min_area: float = 0.0,
    simplify: float = 0.0,
    fill_holes: bool = True,
    is_cancelled: Optional[Callable[[], bool]] = None,
    tmp_dir: Optional[str] = None,
) -> List[Detection]:
    """Polygons of the regions where ``prob >= threshold``.

    prob:      H x W probabilities in [0, 1] (ndarray or np.memmap) on the raster's grid.
    transform: the raster's affine transform (pixel corner convention, as rasterio gives it).
    crs:       the raster's CRS (rasterio CRS, pyproj CRS, WKT or "EPSG:n") for the area; None = pixels.
    min_area:  objects (after hole filling) below this many square pixels are dropped; holes below it filled.
    simplify:  Douglas-Peucker tolerance in pixels (0 = none), topology preserving.
    Returns a list of :class:`Detection`, geometries in the raster's CRS.
    Raises CancelledError when ``is_cancelled()`` becomes true.
    """
    if prob.ndim != 2:
        raise ValueError(f"prob must be 2-D, got shape {prob.shape}")
    with rasterio.Env():  # one GDAL environment, not one per rasterize() call
        return _vectorize(prob, transform, crs, threshold, min_area, simplify, fill_holes, is_cancelled, tmp_dir)


def _vectorize(prob, transform, crs, threshold, min_area, simplify, fill_holes, is_cancelled, tmp_dir):
    area_of = AreaCalculator(crs)
    params = [transform.a, transform.b, transform.d, transform.e, transform.c, transform.f]

    def check_cancel() -> None:
        if is_cancelled is not None and is_cancelled():
            raise CancelledError()

    # 1. polygons with holes handled, small objects dropped
    kept: List[Tuple[Polygon, object]] = []
    filled_holes: List[Polygon] = []
    for i, poly in enumerate(_pixel_polygons(prob, threshold, tmp_dir)):
        if i % 256 == 0:
            check_cancel()
        if not poly.is_valid or poly.is_empty:
            poly = poly.buffer(0)
            if poly.is_empty or not isinstance(poly, Polygon):
                continue
        holes_kept = []
        for ring in poly.interiors:
            hole = Polygon(ring)
            if fill_holes or hole.area < min_area:
                filled_holes.append(hole)
            else:
                holes_kept.append(ring)
        inside = poly.representative_point()  # on the object itself, never in one of its own holes
        if len(holes_kept) != len(poly.interiors):
            poly = Polygon(poly.exterior, holes_kept)
        if poly.area < min_area:
            continue
        kept.append((poly, inside))

    # 2. objects lying in a filled hole now belong to the object around it
    if filled_holes and kept:
        hb = np.array([h.bounds for h in filled_holes])  # bounding boxes first, exact test on candidates
        merged = []
        for poly, p in kept:
            x, y = p.x, p.y
            cand = np.nonzero((hb[:, 0] <= x) & (hb[:, 2] >= x) & (hb[:, 1] <= y) & (hb[:, 3] >= y))[0]
            if any(filled_holes[k].contains(p) for k in cand):
                continue
            merged.append((poly, p))
        kept = merged

    # 3. score, simplification, map coordinates, area
    out: List[Detection] = []
    for i, (poly, _) in enumerate(kept):
        if i % 256 == 0:
            check_cancel()
        score = _mean_inside(prob, poly)
        px_area = float(poly.area)
        g = poly
        if simplify > 0:
            s = poly.simplify(float(simplify), preserve_topology=True)
            if isinstance(s, Polygon) and not s.is_empty and s.is_valid and s.area > 0:
                g = s
        g = _orient_ccw(affinity.affine_transform(g, params))
        out.append(Detection(g, float(score), area_of(g, px_area), area_of.unit, px_area))
    return out


def to_features(detections: Iterable[Detection], **attributes) -> List[Feature]:
    """Features for the writers: geometry plus ``score``, ``area``, ``area_unit`` and the given attributes
    (``class_name``, ``source``, ``ref_id``, ``model`` ... see ``core.results.FIELDS``)."""
    feats = []
    for d in detections:
        attrs = dict(attributes)
        attrs.update(score=round(d.score, 4), area=d.area, area_unit=d.area_unit)
        feats.append(Feature(d.geometry, attrs))
    return feats
