"""Reference geometries (WKT in any CRS) -> a reference crop and its masks on the reference raster's grid.

``build_reference(spec)`` reads the reference raster around the marked objects and returns a
:class:`Reference`: the crop (H x W x 3 uint8), the foreground mask, the background-marked mask, the crop's
window, transform, CRS and ground pixel size.

The crop: a square of ``crop_size`` pixels (default 1024, the model's input and tile size; the pipeline passes
its ``tile_size``) at the raster's native resolution, centred on the foreground marks and shifted to stay inside
the raster (a raster smaller than that gives the whole raster). Taking a crop of the tile size at native
resolution means objects appear to the model at the same scale in the reference as in target tiles (which are
resampled to the reference's ground resolution). When the marks plus ``margin`` pixels of context on each side
do not fit in ``crop_size`` native pixels, the crop is enlarged to fit them and downsampled to ``crop_size``
(``Reference.downsample`` > 1, and ``pixel_size`` grows accordingly, so targets are resampled to match).

Geometries:

* polygons (foreground or background) are rasterised as drawn (pixel centres inside; a polygon smaller than a
  pixel centre gets the pixels it touches);
* lines (scribbles) and points (clicks) are sparse. With ``densify`` (a callable
  ``densify(image HxWx3 uint8, fg_points Nx2, bg_points Mx2) -> HxW bool`` given by the model layer, points as
  ``(x, y)`` crop pixel coordinates), it is called once per foreground scribble with points sampled along it
  (:func:`sample_points_along`) and with the points of every background mark, and the masks are united, together
  with the pixels the scribbles touch. Without ``densify`` (or when it returns an empty mask), scribbles are
  buffered by ``line_width`` pixels;
* background lines are always buffered by ``line_width`` pixels; background pixels are removed from the
  foreground, and so are the raster's nodata pixels.

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
from typing import Callable, List, Optional, Sequence, Tuple

import numpy as np
from rasterio import Affine
from rasterio.features import rasterize
from rasterio.windows import Window
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
from .raster import RasterSource, ground_pixel_size

Densify = Callable[[np.ndarray, np.ndarray, np.ndarray], np.ndarray]

POINT_SPACING = 24.0  # crop pixels between points sampled along a scribble for densify
MAX_POINTS_PER_SCRIBBLE = 16


@dataclass
class Reference:
    """A reference crop and its masks.

    image:      H x W x 3 uint8, the crop (H, W <= crop_size).
    mask:       H x W bool, the foreground (the class), nodata and background marks removed.
    background: H x W bool, pixels marked as background.
    valid:      H x W bool, pixels with data.
    window:     the crop in reference raster pixels (native resolution).
    transform:  affine transform of the crop's pixels (map coordinates of the raster's CRS).
    crs:        the raster's CRS (rasterio CRS) or None.
    res:        (x, y) map units per crop pixel.
    pixel_size: (x, y) ground metres per crop pixel at the crop's centre, or None without a usable CRS: what
                target tiles are resampled to (``tiling.resolution_scale``).
    downsample: native raster pixels per crop pixel (1.0 unless the marks did not fit in crop_size).
    kind:       "polygon", "scribble" or "mixed" (foreground marks).
    densified:  whether ``densify`` produced (part of) the foreground.
    """

    image: np.ndarray
    mask: np.ndarray
    background: np.ndarray
    valid: np.ndarray
    window: Window
    transform: Affine
    crs: object
    res: Tuple[float, float]
    pixel_size: Optional[Tuple[float, float]]
    downsample: float
    raster: str
    ref_id: str
    kind: str
    densified: bool = False

    @property
    def shape(self) -> Tuple[int, int]:
        return self.mask.shape


# -- geometry helpers -------------------------------------------------------------------------------------------
def _flatten(g) -> List:
    """Polygons, lines and points of any geometry (collections and multi-geometries exploded, empties dropped)."""
    if g is None or g.is_empty:
        return []
    if isinstance(g, (MultiPolygon, MultiLineString, MultiPoint, GeometryCollection)):
        out = []
        for part in g.geoms:
            out.extend(_flatten(part))
        return out
    if isinstance(g, LinearRing):
        return [LineString(g.coords)]
    if isinstance(g, (Polygon, LineString, Point)):
        return [g]
    return []


def _lines_of(geoms) -> List:
    return [g for g in geoms if isinstance(g, (LineString, Point))]


def _polys_of(geoms) -> List:
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
        for p in _flatten(g):
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


def _parse(wkts: Sequence[str], ref_id: str, what: str, repaired: Optional[List[str]] = None) -> List:
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
        parts = _flatten(g)
        if not g.is_empty and not parts:
            raise InputError(
                f"The {what} geometry {i + 1} of reference '{ref_id}' is a {g.geom_type}; draw polygons, "
                "lines or points."
            )
        fixed = []
        for part in parts:
            if isinstance(part, Polygon) and not part.is_valid:
                reason = explain_validity(part).split("[")[0].strip().lower()
                polys = [q for q in _flatten(make_valid(part)) if isinstance(q, Polygon) and q.area > 0]
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


# -- the reference ----------------------------------------------------------------------------------------------
def _crop_window(bbox, width: int, height: int, crop_size: int, margin: int) -> Tuple[Window, float]:
    """A square window (native pixels) around ``bbox`` and the downsampling factor to fit it in crop_size."""
    minx, miny, maxx, maxy = bbox
    need = max(maxx - minx, maxy - miny) + 2 * margin
    f = max(1.0, need / crop_size)
    side = int(math.ceil(crop_size * f - 1e-9))
    cx, cy = (minx + maxx) / 2.0, (miny + maxy) / 2.0

    def place(center: float, length: int) -> Tuple[int, int]:
        size = min(side, length)
        start = int(round(center - size / 2.0))
        start = min(max(0, start), length - size)
        return start, size

    c0, w = place(cx, width)
    r0, h = place(cy, height)
    return Window(c0, r0, w, h), f


def _rasterize(geoms, shape, all_touched=False) -> np.ndarray:
    if not geoms:
        return np.zeros(shape, bool)
    return rasterize([(g, 1) for g in geoms], out_shape=shape, fill=0, dtype="uint8",
                     all_touched=all_touched).astype(bool)


def _polygon_mask(polys, shape) -> np.ndarray:
    m = np.zeros(shape, bool)
    for p in polys:
        pm = _rasterize([p], shape)
        if not pm.any():  # thinner than a pixel centre: take what it touches
            pm = _rasterize([p], shape, all_touched=True)
        m |= pm
    return m


def _buffered(lines, shape, width: float) -> np.ndarray:
    if not lines:
        return np.zeros(shape, bool)
    return _rasterize([g.buffer(max(0.5, width)) for g in lines], shape, all_touched=True)


def _n_points(g) -> int:
    if isinstance(g, Point):
        return 1
    return int(min(MAX_POINTS_PER_SCRIBBLE, max(2, round(g.length / POINT_SPACING))))


def _points_of(geoms) -> np.ndarray:
    pts = [sample_points_along(g, _n_points(g)) for g in geoms]
    return np.concatenate(pts) if pts else np.zeros((0, 2), np.float64)


@dataclass
class _Marks:
    """A reference's marks in native pixel coordinates of its raster (parsed, transformed, clipped)."""

    spec: ReferenceSpec
    name: str
    width: int
    height: int
    fg: List
    bg: List
    pixel_size: Optional[Tuple[float, float]]  # native ground metres per pixel (None without a usable CRS)
    repaired: List[str]  # why each repaired (invalid) polygon was invalid

    def boxes(self) -> List[Tuple[float, float, float, float]]:
        return [g.bounds for g in self.fg]

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


def _read_marks(spec: ReferenceSpec, src: RasterSource) -> _Marks:
    """Parse the spec's geometries and bring them to ``src``'s native pixels (see the module docstring)."""
    ref_id = spec.ref_id
    repaired: List[str] = []
    fg = _parse(spec.foreground, ref_id, "foreground", repaired)
    bg = _parse(spec.background, ref_id, "background", repaired)
    if not fg:
        if bg:
            raise InputError(
                f"Reference '{ref_id}' has only background marks; mark at least one example of the class itself."
            )
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
            out.extend(q for q in _flatten(p) if type(q) is type(g) or isinstance(g, LineString))
        return out

    fg_px, bg_px = clip(fg), clip(bg)
    fg_px = [g for g in fg_px if not (isinstance(g, Polygon) and g.area == 0)]
    if not fg_px:
        raise InputError(
            f"The foreground marks of reference '{ref_id}' lie outside the raster '{name}'; check that they "
            "were drawn on this raster and that their CRS is right."
        )
    pixel_size = src.ground_pixel_size() if src.crs is not None else None
    return _Marks(spec, name, src.width, src.height, fg_px, bg_px, pixel_size, repaired)


def _crop(src: RasterSource, marks: _Marks, window: Window, f: float, densify: Optional[Densify],
          line_width: float) -> Reference:
    """The reference of ``marks`` in ``window`` (native pixels) read at ``f`` native pixels per crop pixel."""
    spec, ref_id, name = marks.spec, marks.spec.ref_id, marks.name
    out_shape = (max(1, int(round(window.height / f))), max(1, int(round(window.width / f))))
    image, valid = src.read_rgb8(window, out_shape=out_shape)
    transform = src.window_transform(window, out_shape)
    sx, sy = out_shape[1] / window.width, out_shape[0] / window.height
    to_crop = [sx, 0, 0, sy, -window.col_off * sx, -window.row_off * sy]
    frame = box(0, 0, out_shape[1], out_shape[0])
    fg_c = [affinity.affine_transform(g, to_crop) for g in marks.fg]
    fg_c = [g for g in fg_c if g.intersects(frame)]
    bg_c = [affinity.affine_transform(g, to_crop) for g in marks.bg]
    shape = out_shape
    crs = src.crs
    res = (abs(transform.a), abs(transform.e))
    pixel_size = ground_pixel_size(crs, transform, out_shape[1], out_shape[0]) if crs is not None else None

    fg_polys, fg_lines = _polys_of(fg_c), _lines_of(fg_c)
    bg_polys, bg_lines = _polys_of(bg_c), _lines_of(bg_c)
    background = _polygon_mask(bg_polys, shape) | _buffered(bg_lines, shape, line_width)
    mask = _polygon_mask(fg_polys, shape)
    densified = False
    if fg_lines:
        line_px = _rasterize([g for g in fg_lines if not isinstance(g, Point)], shape, all_touched=True)
        line_px |= _rasterize([g.buffer(0.5) for g in fg_lines if isinstance(g, Point)], shape, all_touched=True)
        dense = np.zeros(shape, bool)
        if densify is not None:
            bg_pts = _points_of(bg_lines + [p.representative_point() for p in bg_polys])
            for g in fg_lines:
                pts = _points_of([g])
                inside = (pts[:, 0] >= 0) & (pts[:, 0] < shape[1]) & (pts[:, 1] >= 0) & (pts[:, 1] < shape[0])
                if not inside.any():
                    continue
                m = np.asarray(densify(image, pts[inside], bg_pts))
                if m.shape != tuple(shape):
                    raise ValueError(f"densify returned a mask of shape {m.shape}, expected {tuple(shape)}")
                dense |= m.astype(bool)
        if dense.any():
            densified = True
            mask |= dense | line_px
        else:
            mask |= _buffered(fg_lines, shape, line_width) | line_px
    mask &= ~background
    mask &= valid
    if not mask.any():
        raise InputError(
            f"The foreground marks of reference '{ref_id}' cover no valid pixel of '{name}' (nodata, or all "
            "covered by background marks)."
        )
    kind = "mixed" if (fg_polys and fg_lines) else ("polygon" if fg_polys else "scribble")
    return Reference(
        image=image, mask=mask, background=background & valid, valid=valid, window=window, transform=transform,
        crs=crs, res=res, pixel_size=pixel_size, downsample=f, raster=spec.raster, ref_id=ref_id, kind=kind,
        densified=densified,
    )


def build_reference(
    spec: ReferenceSpec,
    densify: Optional[Densify] = None,
    margin: int = 32,
    crop_size: int = 1024,
    line_width: float = 3.0,
    bands: Optional[Sequence[int]] = None,
) -> Reference:
    """One crop around ALL of ``spec``'s marks (enlarged and downsampled when they do not fit in crop_size).

    The mask preview and single-crop callers use it; a run uses :func:`build_references` (one crop per cluster
    of objects at the working scale, never a crop downsampled because the marks are far apart).

    margin:     minimum context in native pixels kept around the foreground marks.
    crop_size:  side of the crop in pixels (the model's tile size).
    line_width: buffer radius in crop pixels for scribbles (without densify) and background lines.
    bands:      band choice for the reference raster (as RasterSource).
    Raises InputError for: no geometry, only background marks, unparsable WKT, an unknown or untransformable CRS,
    geometries outside the raster, and marks that cover no valid pixel.
    """
    with RasterSource(spec.raster, bands=bands) as src:
        marks = _read_marks(spec, src)
        b = marks.boxes()
        bbox = (min(v[0] for v in b), min(v[1] for v in b), max(v[2] for v in b), max(v[3] for v in b))
        window, f = _crop_window(bbox, src.width, src.height, int(crop_size), int(margin))
        return _crop(src, marks, window, f, densify, line_width)


def build_references(
    spec: ReferenceSpec,
    zoom: float = 1.0,
    densify: Optional[Densify] = None,
    margin: int = 32,
    crop_size: int = 1024,
    line_width: float = 3.0,
    bands: Optional[Sequence[int]] = None,
) -> List[Reference]:
    """The K-shot references of ``spec`` at ``zoom`` (working pixels per native pixel): one ``crop_size`` crop
    per cluster of marked objects (:func:`core.scale.plan_crops`), each a shot. Errors as :func:`build_reference`.
    A crop whose marks cover no valid pixel is left out; the error is raised only when every crop is empty."""
    from .scale import plan_crops

    with RasterSource(spec.raster, bands=bands) as src:
        marks = _read_marks(spec, src)
        crops = plan_crops(marks.boxes(), zoom, src.width, src.height, int(crop_size), int(margin))
        refs, first_error = [], None
        for c0, r0, w, h in crops:
            try:
                refs.append(_crop(src, marks, Window(c0, r0, w, h), 1.0 / zoom, densify, line_width))
            except InputError as e:
                first_error = first_error or e
        if not refs:
            raise first_error
        return refs


@dataclass
class ReferenceSet:
    """A run's references: the shots (:class:`Reference`, one per crop), the working scale
    (:class:`core.scale.ScaleChoice`) and sentences for the run notes (polygons repaired)."""

    refs: List[Reference]
    scale: object
    notes: List[str]

    def __iter__(self):  # refs, scale = reference_set(...)
        return iter((self.refs, self.scale))


def reference_set(
    specs: Sequence[ReferenceSpec],
    scale=None,
    densify: Optional[Densify] = None,
    margin: int = 32,
    crop_size: int = 1024,
    line_width: float = 3.0,
    bands: Optional[Sequence[int]] = None,
):
    """All references of a run at one working scale -> :class:`ReferenceSet` (unpacks as ``refs, scale``).

    ``scale`` None / ``"auto"``: the rule of :mod:`core.scale` on the marked objects' sizes (polygons: their
    area; scribbles: the densified masks at native resolution when ``densify`` is given, else their extent).
    A number: the zoom relative to the FIRST reference raster's native resolution. The working ground
    resolution is the same for every reference: the zoom of reference k is its native pixel size over the
    working one (rasters without CRS: the same zoom).
    """
    from .scale import choose, object_sizes

    marks: List[_Marks] = []
    for spec in specs:
        with RasterSource(spec.raster, bands=bands) as src:
            marks.append(_read_marks(spec, src))
    gsd = [math.sqrt(m.pixel_size[0] * m.pixel_size[1]) if m.pixel_size else None for m in marks]
    native = {}
    sizes = []  # in native pixels of the first reference
    for k, m in enumerate(marks):
        if densify is not None and m.line_sizes().size:
            native[k] = build_references(m.spec, 1.0, densify, margin, crop_size, line_width, bands)
            ks = np.concatenate([object_sizes(r.mask) for r in native[k]])
        else:
            ks = np.concatenate([m.polygon_sizes(), m.line_sizes()])
        ratio = gsd[k] / gsd[0] if gsd[k] and gsd[0] else 1.0
        sizes.append(ks * ratio)
    choice = choose(np.concatenate(sizes), scale)
    refs: List[Reference] = []
    for k, m in enumerate(marks):
        zoom = choice.zoom * (gsd[k] / gsd[0] if gsd[k] and gsd[0] else 1.0)
        if k in native and abs(zoom - 1.0) < 1e-6:
            refs.extend(native[k])
        else:
            refs.extend(build_references(m.spec, zoom, densify, margin, crop_size, line_width, bands))
    notes = []
    for m in marks:
        if m.repaired:
            n = len(m.repaired)
            notes.append(
                f"Reference '{m.spec.ref_id}': {n} invalid polygon{'s were' if n > 1 else ' was'} repaired "
                f"({', '.join(sorted(set(m.repaired)))}), as QGIS's Fix Geometries does."
            )
    return ReferenceSet(refs, choice, notes)
