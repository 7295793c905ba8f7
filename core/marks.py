"""A reference's marks: WKT geometries in any CRS -> shapely geometries in native pixels of its raster.

``read_marks(spec, src)`` parses the spec's foreground and background WKT, repairs invalid polygons (a bow-tie,
a ring that crosses itself) as QGIS's Fix Geometries does (``make_valid``; each repair is reported in
``Marks.repaired`` for the run notes) and refuses what cannot be repaired with a sentence naming the problem,
transforms the geometries to the raster's CRS and pixel frame and clips them to the raster.

A spec whose foreground is empty and whose background is not is a *negative reference* ("not this class" marks,
typically result polygons on a target raster): ``read_marks(..., allow_negative=True)`` returns it with
``Marks.negative`` True; :func:`core.reference.reference_set` turns it into negative examples.

CRS: ``spec.crs`` empty = the raster's CRS; otherwise any WKT or authority string (``EPSG:4326``), transformed to
the raster's CRS. A raster without georeferencing has no CRS: its geometries are in pixel coordinates, either as
QGIS shows such a raster (x = column, y = -row: what marks drawn in QGIS are) or, when every geometry lies at
y >= 0 (where nothing of the raster is in QGIS's frame), as image coordinates (x = column, y = row downwards,
as most annotation tools write them).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

import numpy as np
from shapely import affinity, wkt
from shapely.errors import ShapelyError
from shapely.geometry import (
    GeometryCollection,
    LinearRing,
    LineString,
    MultiLineString,
    MultiPoint,
    MultiPolygon,
    Point,
    Polygon,
    box,
)

from .errors import InputError
from .params import ReferenceSpec
from .raster import RasterSource


def flatten(g) -> List:
    """Polygons, lines and points of any geometry (collections and multi-geometries exploded, empties dropped)."""
    if g is None or g.is_empty:
        return []
    if isinstance(g, (MultiPolygon, MultiLineString, MultiPoint, GeometryCollection)):
        out = []
        for part in g.geoms:
            out.extend(flatten(part))
        return out
    if isinstance(g, LinearRing):
        return [LineString(g.coords)]
    if isinstance(g, (Polygon, LineString, Point)):
        return [g]
    return []


def lines_of(geoms) -> List:
    return [g for g in geoms if isinstance(g, (LineString, Point))]


def polys_of(geoms) -> List:
    return [g for g in geoms if isinstance(g, Polygon)]


def sample_points_along(lines, n: int) -> np.ndarray:
    """``n`` points spread evenly along ``lines`` (a geometry or a list: LineStrings, MultiLineStrings, rings,
    polygon outlines; Points count as themselves). Returns an ``n x 2`` float64 array of ``(x, y)`` in the
    lines' coordinates.

    Points are shared in proportion to length (largest remainders), every line getting at least one when ``n``
    >= the number of lines (otherwise the ``n`` longest get one); each line's points sit at the centres of ``k``
    equal pieces of it.
    """
    if hasattr(lines, "geom_type"):
        lines = [lines]
    parts = []
    for g in lines:
        for p in flatten(g):
            parts.append(LineString(p.exterior.coords) if isinstance(p, Polygon) else p)
    n = int(n)
    if n <= 0 or not parts:
        return np.zeros((0, 2), np.float64)
    lengths = np.array([p.length if isinstance(p, LineString) else 0.0 for p in parts])
    order = np.argsort(-lengths, kind="stable")
    counts = np.zeros(len(parts), int)
    total = lengths.sum()
    if n < len(parts):
        counts[order[:n]] = 1
    elif total <= 0:
        counts[:] = 1
        counts[order[0]] += n - len(parts)
    else:
        share = n * lengths / total
        counts = np.maximum(1, np.floor(share).astype(int))
        rem = share - np.floor(share)
        while counts.sum() < n:  # largest remainders first
            k = int(np.argmax(rem))
            counts[k] += 1
            rem[k] = -1.0
        while counts.sum() > n:  # the minimum of one point each overshot: take from the most crowded
            k = int(np.argmax(np.where(counts > 1, counts - share, -np.inf)))
            counts[k] -= 1
    pts = []
    for p, k in zip(parts, counts):
        if k == 0:
            continue
        if isinstance(p, Point) or p.length == 0:
            xy = p.coords[0]
            pts.extend([xy[:2]] * k)
        else:
            for j in range(k):
                q = p.interpolate((j + 0.5) / k * p.length)
                pts.append((q.x, q.y))
    return np.asarray(pts, dtype=np.float64).reshape(-1, 2)


def parse_geometries(wkts: Sequence[str], ref_id: str, what: str, repaired: Optional[List[str]] = None) -> List:
    """WKT -> polygons, lines and points. An invalid polygon (a bow-tie, a ring that crosses itself) is made
    valid as QGIS's Fix Geometries does (``make_valid``) and its reason appended to ``repaired``; one that
    leaves nothing with an area is refused with the reason."""
    from shapely.validation import explain_validity, make_valid

    out = []
    for i, text in enumerate(wkts):
        if text is None or not str(text).strip():
            continue
        try:
            g = wkt.loads(str(text))
        except (ShapelyError, ValueError, TypeError, AttributeError, IndexError) as e:  # noqa: F841
            snippet = str(text).strip()
            snippet = snippet if len(snippet) <= 60 else snippet[:57] + "..."
            raise InputError(
                f"The {what} geometry {i + 1} of reference '{ref_id}' is not valid WKT: '{snippet}'."
            ) from None
        parts = flatten(g)
        if not g.is_empty and not parts:
            raise InputError(
                f"The {what} geometry {i + 1} of reference '{ref_id}' is a {g.geom_type}; draw polygons, "
                "lines or points."
            )
        fixed = []
        for part in parts:
            if isinstance(part, Polygon) and not part.is_valid:
                reason = explain_validity(part).split("[")[0].strip().lower()
                polys = [q for q in flatten(make_valid(part)) if isinstance(q, Polygon) and q.area > 0]
                if not polys:
                    raise InputError(
                        f"The {what} polygon {i + 1} of reference '{ref_id}' cannot be repaired ({reason}): "
                        "it encloses no area; draw it again."
                    )
                if repaired is not None:
                    repaired.append(reason)
                fixed.extend(polys)
            else:
                fixed.append(part)
        out.extend(fixed)
    return out


def _transformer(spec_crs: str, src: RasterSource, ref_id: str):
    """A function (x, y) -> (x, y) from the geometries' CRS to the raster's, or None when they are the same."""
    if not spec_crs or not spec_crs.strip():
        return None
    import pyproj

    try:
        gcrs = pyproj.CRS.from_user_input(spec_crs.strip())
    except pyproj.exceptions.CRSError:
        raise InputError(
            f"The CRS '{spec_crs}' of reference '{ref_id}' is not a known coordinate reference system."
        ) from None
    if src.crs is None:
        raise InputError(
            f"The reference raster '{os.path.basename(src.path)}' has no CRS, so geometries in "
            f"'{gcrs.to_string()}' cannot be placed on it; leave the CRS empty to give raster coordinates."
        )
    rcrs = pyproj.CRS.from_wkt(src.crs.to_wkt())
    if gcrs == rcrs:
        return None
    try:
        return pyproj.Transformer.from_crs(gcrs, rcrs, always_xy=True)
    except pyproj.exceptions.ProjError:
        raise InputError(
            f"The geometries of reference '{ref_id}' are in '{gcrs.to_string()}', which cannot be transformed to "
            f"the raster's CRS '{rcrs.to_string()}'."
        ) from None


def _apply(tr, geoms: List, ref_id: str, crs_name: str, raster_crs: str) -> List:
    from shapely.ops import transform as shp_transform

    out = []
    for g in geoms:
        try:
            t = shp_transform(tr.transform, g)
        except Exception:  # noqa: BLE001 - pyproj errors of many kinds
            t = None
        ok = t is not None and not t.is_empty and all(math.isfinite(v) for v in t.bounds)
        if not ok:
            raise InputError(
                f"A geometry of reference '{ref_id}' cannot be transformed from '{crs_name}' to the raster's CRS "
                f"'{raster_crs}' (check the CRS of the geometries)."
            )
        out.append(t)
    return out


@dataclass
class Marks:
    """A reference's marks in native pixel coordinates of its raster (parsed, transformed, clipped)."""

    spec: ReferenceSpec
    name: str
    width: int
    height: int
    fg: List
    bg: List
    pixel_size: Optional[Tuple[float, float]]  # native ground metres per pixel (None without a usable CRS)
    repaired: List[str]  # why each repaired (invalid) polygon was invalid
    negative: bool = False  # no foreground: "not this class" marks only (a negative reference)

    def boxes(self) -> List[Tuple[float, float, float, float]]:
        """Pixel boxes of the marks that place the crops: the foreground's (a negative reference: the background's)."""
        return [g.bounds for g in (self.bg if self.negative else self.fg)]

    def polygon_sizes(self) -> np.ndarray:
        """sqrt(area) in native pixels of each foreground polygon."""
        return np.asarray([math.sqrt(g.area) for g in self.fg if isinstance(g, Polygon)], np.float64)

    def line_sizes(self) -> np.ndarray:
        """The longer side of each scribble's extent (native pixels): a rough object size without densifying."""
        out = []
        for g in self.fg:
            if isinstance(g, (LineString, Point)):
                x0, y0, x1, y1 = g.bounds
                out.append(max(x1 - x0, y1 - y0, 1.0))
        return np.asarray(out, np.float64)


ONLY_BACKGROUND = "Reference '{}' has only background marks; mark at least one example of the class itself."


def read_marks(spec: ReferenceSpec, src: RasterSource, allow_negative: bool = False) -> Marks:
    """Parse the spec's geometries and bring them to ``src``'s native pixels (see the module docstring).

    ``allow_negative``: a spec with background marks only is a negative reference (``Marks.negative``);
    without it, such a spec is refused with :data:`ONLY_BACKGROUND`."""
    ref_id = spec.ref_id
    repaired: List[str] = []
    fg = parse_geometries(spec.foreground, ref_id, "foreground", repaired)
    bg = parse_geometries(spec.background, ref_id, "background", repaired)
    negative = not fg and bool(bg) and allow_negative
    if not fg and not negative:
        if bg:
            raise InputError(ONLY_BACKGROUND.format(ref_id))
        raise InputError(
            f"Reference '{ref_id}' has no geometry; draw at least one polygon or scribble on an example of the class."
        )
    name = os.path.basename(src.path)
    tr = _transformer(spec.crs, src, ref_id)
    if tr is not None:
        raster_crs = src.crs.to_string()
        fg = _apply(tr, fg, ref_id, spec.crs, raster_crs)
        bg = _apply(tr, bg, ref_id, spec.crs, raster_crs)
    inv = ~src.transform
    to_px = [inv.a, inv.b, inv.d, inv.e, inv.c, inv.f]
    if not src.georeferenced and tr is None and min(g.bounds[1] for g in fg + bg) >= 0:
        to_px = [1, 0, 0, 1, 0, 0]  # image coordinates (y = row, downwards), see the module docstring
    frame = box(0, 0, src.width, src.height)

    def clip(geoms):
        out = []
        for g in geoms:
            p = affinity.affine_transform(g, to_px)
            if isinstance(p, Point):
                if frame.covers(p):
                    out.append(p)
                continue
            p = p.intersection(frame) if not frame.covers(p) else p
            out.extend(q for q in flatten(p) if type(q) is type(g) or isinstance(g, LineString))
        return out

    fg_px, bg_px = clip(fg), clip(bg)
    fg_px = [g for g in fg_px if not (isinstance(g, Polygon) and g.area == 0)]
    if negative:
        bg_px = [g for g in bg_px if not (isinstance(g, Polygon) and g.area == 0)]
    if not (bg_px if negative else fg_px):
        raise InputError(
            f"The {'negative (background)' if negative else 'foreground'} marks of reference '{ref_id}' lie "
            f"outside the raster '{name}'; check that they were drawn on this raster and that their CRS is right."
        )
    pixel_size = src.ground_pixel_size() if src.crs is not None else None
    return Marks(spec, name, src.width, src.height, fg_px, bg_px, pixel_size, repaired, negative)
