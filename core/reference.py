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

Parsing, repair of invalid polygons, CRS and pixel frames: :mod:`core.marks`. A negative reference (background
marks only, e.g. result polygons marked "Not <class>" on a target raster) gives *negative examples*
(:func:`negative_references`: crops at the working scale whose ``background`` mask is the marked regions);
:func:`reference_set` returns them beside the shots.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, List, Optional, Sequence, Tuple

import numpy as np
from rasterio import Affine
from rasterio.features import rasterize
from rasterio.windows import Window
from shapely import affinity
from shapely.geometry import Point, box

from .errors import InputError
from .marks import Marks, lines_of, polys_of, read_marks, sample_points_along  # noqa: F401 (re-exported)
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



def _crop(src: RasterSource, marks: Marks, window: Window, f: float, densify: Optional[Densify],
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

    fg_polys, fg_lines = polys_of(fg_c), lines_of(fg_c)
    bg_polys, bg_lines = polys_of(bg_c), lines_of(bg_c)
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
        marks = read_marks(spec, src)
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
        marks = read_marks(spec, src)
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


def _negative_crop(src: RasterSource, marks: Marks, window: Window, f: float, line_width: float,
                   geoms: Sequence) -> Reference:
    """A negative example of ``marks`` (a negative reference) in ``window`` read at ``f`` native pixels per crop
    pixel: ``background`` holds the marked regions ``geoms`` (pixel frame; the crop's own), ``mask`` is empty;
    None when they cover no valid pixel."""
    out_shape = (max(1, int(round(window.height / f))), max(1, int(round(window.width / f))))
    image, valid = src.read_rgb8(window, out_shape=out_shape)
    transform = src.window_transform(window, out_shape)
    sx, sy = out_shape[1] / window.width, out_shape[0] / window.height
    to_crop = [sx, 0, 0, sy, -window.col_off * sx, -window.row_off * sy]
    bg_c = [affinity.affine_transform(g, to_crop) for g in geoms]
    background = (_polygon_mask(polys_of(bg_c), out_shape) | _buffered(lines_of(bg_c), out_shape, line_width)) & valid
    if not background.any():
        return None
    crs = src.crs
    pixel_size = ground_pixel_size(crs, transform, out_shape[1], out_shape[0]) if crs is not None else None
    return Reference(
        image=image, mask=np.zeros(out_shape, bool), background=background, valid=valid, window=window,
        transform=transform, crs=crs, res=(abs(transform.a), abs(transform.e)), pixel_size=pixel_size,
        downsample=f, raster=marks.spec.raster, ref_id=marks.spec.ref_id, kind="negative",
    )


def negative_references(
    spec: ReferenceSpec,
    zoom: float = 1.0,
    margin: int = 32,
    crop_size: int = 1024,
    line_width: float = 3.0,
    bands: Optional[Sequence[int]] = None,
) -> List[Reference]:
    """The negative examples of a negative reference ``spec`` (background marks only) at ``zoom``: one
    ``crop_size`` crop per cluster of marked regions (:func:`core.scale.plan_crops`), ``Reference.background``
    the marked regions (``kind`` "negative"). Raises InputError when they cover no valid pixel."""
    from .scale import plan_crops

    with RasterSource(spec.raster, bands=bands) as src:
        marks = read_marks(spec, src, allow_negative=True)
        boxes = marks.boxes()
        crops = plan_crops(boxes, zoom, src.width, src.height, int(crop_size), int(margin))
        # each marked region in one crop only (the first holding its centre): crops may overlap, and a region
        # seen twice would be two negative prototypes and counted twice in the run's note
        owner = [next((k for k, (c0, r0, w, h) in enumerate(crops)
                       if c0 <= (b[0] + b[2]) / 2 < c0 + w and r0 <= (b[1] + b[3]) / 2 < r0 + h), 0) for b in boxes]
        out = [_negative_crop(src, marks, Window(c0, r0, w, h), 1.0 / zoom, line_width,
                              [g for g, o in zip(marks.bg, owner) if o == k])
               for k, (c0, r0, w, h) in enumerate(crops)]
        out = [r for r in out if r is not None]
        if not out:
            raise InputError(
                f"The negative marks of reference '{spec.ref_id}' cover no valid pixel of '{marks.name}' (nodata)."
            )
        return out


@dataclass
class ReferenceSet:
    """A run's references: the shots (:class:`Reference`, one per crop), the working scale
    (:class:`core.scale.ScaleChoice`), sentences for the run notes (polygons repaired) and the negative examples
    (:class:`Reference` of kind "negative", from references with background marks only; may be empty)."""

    refs: List[Reference]
    scale: object
    notes: List[str]
    negatives: List[Reference] = field(default_factory=list)
    working_gsd: Optional[float] = None  # ground metres per working pixel (None: rasters without a usable CRS)

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
    working_gsd: Optional[float] = None,
):
    """All references of a run at one working scale -> :class:`ReferenceSet` (unpacks as ``refs, scale``).

    ``scale`` None / ``"auto"``: the rule of :mod:`core.scale` on the marked objects' sizes (polygons: their
    area; scribbles: the densified masks at native resolution when ``densify`` is given, else their extent).
    A number: the zoom relative to the FIRST reference raster's native resolution. The working ground
    resolution is the same for every reference: the zoom of reference k is its native pixel size over the
    working one (rasters without CRS: the same zoom).

    References with background marks only are negative references, allowed on any raster: their marks become
    ``ReferenceSet.negatives`` at the working scale (they do not choose it). At least one reference must have
    foreground marks (else :data:`core.marks.ONLY_BACKGROUND`).

    ``working_gsd`` (ground metres per working pixel) fixes the working resolution instead of ``scale`` (the other
    classes of a several-class run work at the first class's, so that they share the tiles).
    """
    from .marks import ONLY_BACKGROUND
    from .scale import ScaleChoice, choose, object_sizes

    marks: List[Marks] = []
    for spec in specs:
        with RasterSource(spec.raster, bands=bands) as src:
            marks.append(read_marks(spec, src, allow_negative=True))
    if marks and all(m.negative for m in marks):
        raise InputError(ONLY_BACKGROUND.format(marks[0].spec.ref_id))
    gsd = [math.sqrt(m.pixel_size[0] * m.pixel_size[1]) if m.pixel_size else None for m in marks]
    base = gsd[next(k for k, m in enumerate(marks) if not m.negative)]  # the first reference with foreground

    def ratio(k: int) -> float:
        return gsd[k] / base if gsd[k] and base else 1.0

    native = {}
    sizes = []  # in native pixels of the first reference
    for k, m in enumerate(marks):
        if m.negative:
            continue
        if densify is not None and m.line_sizes().size:
            native[k] = build_references(m.spec, 1.0, densify, margin, crop_size, line_width, bands)
            ks = np.concatenate([object_sizes(r.mask) for r in native[k]])
        else:
            ks = np.concatenate([m.polygon_sizes(), m.line_sizes()])
        sizes.append(ks * ratio(k))
    choice = choose(np.concatenate(sizes), scale)
    if working_gsd and base:
        choice = ScaleChoice(base / working_gsd, False, choice.median_object_px)
    refs: List[Reference] = []
    negatives: List[Reference] = []
    for k, m in enumerate(marks):
        zoom = choice.zoom * ratio(k)
        if m.negative:
            negatives.extend(negative_references(m.spec, zoom, margin, crop_size, line_width, bands))
        elif k in native and abs(zoom - 1.0) < 1e-6:
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
    return ReferenceSet(refs, choice, notes, negatives, base / choice.zoom if base else None)
