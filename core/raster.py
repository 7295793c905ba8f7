"""Reading target and reference rasters window by window, as 8-bit RGB.

:class:`RasterSource` wraps a rasterio dataset. It never reads a raster whole: statistics come from overviews or
a decimated / sampled read, pixels from windows.

Band choice (``bands`` are 1-based indices in file order):

* ``None``: the first three bands in file order that are not alpha bands; a raster with one (non-alpha) band
  gives that band replicated to R, G and B (a palette raster gives its colour table's RGB); a raster with two
  gives ``(b1, b2, mean(b1, b2))``.
* a tuple of 1, 2 or 3 band numbers: the same rules applied to those bands, in the order given.

8-bit stretch: ``uint8`` bands pass through unchanged. Any other type (``uint16``, ``int16``, ``float32`` ...) is
stretched linearly per band from its 2nd to its 98th percentile onto 0..255. The percentiles come from one read
decimated to at most ``STATS_SIZE`` pixels a side, served by GDAL from the coarsest overview that still has 512
pixels on its longer side, when that overview (or the raster itself) has at most ``STATS_SAMPLE_ABOVE`` pixels;
otherwise (a large raster without small overviews) from a grid of ``STATS_GRID`` x ``STATS_GRID`` small windows
spread over the raster, so a 16384 x 16384 GeoTIFF is never decoded whole. Nodata, masked (alpha, internal mask) and NaN pixels
are ignored.

Rasters without georeferencing (a plain PNG / JPEG, a GeoTIFF without CRS and geotransform) are processed in
the pixel frame QGIS shows them in: x = column, y = -row, no CRS (:data:`PIXEL_FRAME`). Marks drawn on such a
raster in QGIS and the polygons written for it then lie on the image; the output layers have no CRS and areas
in pixels (``px2``). A raster with a geotransform but no CRS keeps its geotransform (and is written without CRS).

Validity: a pixel is valid when at least one of the chosen bands is valid there (GDAL's mask: nodata value, alpha
band or internal mask) and none of the chosen bands is NaN. Invalid pixels are 0 in the RGB output.
"""

from __future__ import annotations

import math
import os
import re
import warnings
from typing import Optional, Sequence, Tuple, Union

import numpy as np
import rasterio
from rasterio.enums import ColorInterp, Resampling
from rasterio.errors import NotGeoreferencedWarning, RasterioError, RasterioIOError
from rasterio.windows import Window

from .errors import InputError

# Longest side of the decimated read used for percentiles on rasters without overviews.
STATS_SIZE = 1024
# Above this many pixels (and without overviews) statistics come from a grid of sample windows instead.
STATS_SAMPLE_ABOVE = 4096 * 4096
STATS_GRID = 12  # STATS_GRID x STATS_GRID sample windows
STATS_WINDOW = 96  # pixels a side of each sample window
PERCENTILES = (2.0, 98.0)

_URL = re.compile(r"^(https?|ftp|s3|gs|wms|wmts|xyz)://|^/vsi(curl|s3|gs|az|oss|swift|hdfs|webhdfs)", re.I)
_RASTER_EXTENSIONS = {
    ".tif", ".tiff", ".gtiff", ".jp2", ".j2k", ".png", ".jpg", ".jpeg", ".img", ".vrt", ".ecw", ".sid",
    ".bil", ".dem", ".asc", ".nc", ".hdf", ".h5", ".kea", ".webp", ".gif", ".bmp",
}

WindowLike = Union[Window, Tuple[int, int, int, int]]

# The frame of a raster without georeferencing, as QGIS displays it: x = column, y = -row (north up).
PIXEL_FRAME = rasterio.Affine(1.0, 0.0, 0.0, 0.0, -1.0, 0.0)

try:  # GDAL errors surfacing from reads: rasterio raises RasterioIOError (an OSError) or a CPLE_* error
    from rasterio._err import CPLE_BaseError as _CPLE
except ImportError:  # pragma: no cover
    _CPLE = RasterioError
_READ_ERRORS = (RasterioError, RasterioIOError, _CPLE, MemoryError)


def _is_web_source(path: str) -> bool:
    p = path.strip()
    low = p.lower()
    return bool(
        _URL.search(p)
        or low.startswith(("wms:", "wmts:", "<gdal_wms", "<gdal_wmts"))
        or ("url=" in low and ("type=xyz" in low or "crs=" in low or "layers=" in low))
    )


def as_window(window: WindowLike) -> Window:
    """A rasterio Window from a Window or a ``(col_off, row_off, width, height)`` tuple."""
    if isinstance(window, Window):
        return window
    col, row, w, h = window
    return Window(col, row, w, h)


def _to_pyproj(crs):
    import pyproj

    if crs is None:
        return None
    if isinstance(crs, pyproj.CRS):
        return crs
    if hasattr(crs, "to_wkt"):
        return pyproj.CRS.from_wkt(crs.to_wkt())
    return pyproj.CRS.from_user_input(crs)


def ground_pixel_size(crs, transform, width: int, height: int) -> Optional[Tuple[float, float]]:
    """Ground size in metres of one pixel (along a row, along a column) at the centre of a raster.

    Geodesic distances on the CRS's ellipsoid, so it is right for geographic CRSs (degrees) and for Web Mercator
    (whose "metres" are inflated by 1 / cos(latitude)). Falls back to ``res * unit`` for CRSs that cannot be
    related to an ellipsoid, and returns None when there is no CRS or its unit is unknown.
    """
    pcrs = _to_pyproj(crs)
    if pcrs is None:
        return None
    import pyproj

    cx, cy = width / 2.0, height / 2.0
    pts = [transform * (cx, cy), transform * (cx + 1, cy), transform * (cx, cy + 1)]
    try:
        geod_crs = pcrs.geodetic_crs
        if geod_crs is None:
            raise ValueError("no geodetic CRS")
        if pcrs.is_geographic:
            lonlat = pts
        else:
            tr = pyproj.Transformer.from_crs(pcrs, geod_crs, always_xy=True)
            lonlat = [tr.transform(x, y) for x, y in pts]
        geod = geod_crs.get_geod()
        (lo0, la0), (lo1, la1), (lo2, la2) = lonlat
        dx = geod.inv(lo0, la0, lo1, la1)[2]
        dy = geod.inv(lo0, la0, lo2, la2)[2]
        if not (math.isfinite(dx) and math.isfinite(dy)) or dx <= 0 or dy <= 0:
            raise ValueError("degenerate")
        return float(dx), float(dy)
    except Exception:  # noqa: BLE001 - fall back to the linear unit
        try:
            factor = pcrs.axis_info[0].unit_conversion_factor
            if pcrs.is_projected and factor:
                return abs(transform.a) * factor, abs(transform.e) * factor
        except Exception:  # noqa: BLE001
            pass
        return None


class RasterSource:
    """A raster opened for windowed 8-bit RGB reads.

    ``RasterSource(path, bands=None)``; use as a context manager or call :meth:`close`.

    Attributes: ``path``, ``width``, ``height``, ``count`` (bands in the file), ``bands`` (the 1-based bands
    read, 1 to 3 of them), ``dtype`` (of the first chosen band), ``nodata``, ``crs`` (rasterio CRS or None),
    ``transform`` (Affine, north-up; :data:`PIXEL_FRAME` without georeferencing), ``res`` ((x, y) map units per
    pixel), ``bounds`` (in the frame of ``transform``), ``georeferenced`` (False for a plain image without CRS and
    transform: QGIS's pixel frame then),
    ``stretch`` (per chosen band ``(low, high)`` or None for uint8 pass-through).

    Raises :class:`InputError` for a missing file, a file that is not a raster, a corrupted file, a web service
    (WMS / XYZ / URL), a rotated or GCP-only georeferencing, and invalid band numbers.
    """

    def __init__(self, path: str, bands: Optional[Sequence[int]] = None) -> None:
        self.path = str(path)
        self._ds = None
        if not self.path.strip():
            raise InputError("No raster path was given.")
        if _is_web_source(self.path):
            raise InputError(
                f"'{self.path}' is a web service or URL (WMS, XYZ, HTTP); ViRefSAM needs a local raster file: "
                "save the area you need as a GeoTIFF (Export > Save As...) and use that file."
            )
        if not os.path.exists(self.path):
            raise InputError(f"The raster file '{self.path}' does not exist.")
        if os.path.isdir(self.path):
            raise InputError(f"'{self.path}' is a folder, not a raster file.")
        name = os.path.basename(self.path)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", NotGeoreferencedWarning)
                self._ds = rasterio.open(self.path)
        except RasterioIOError as e:
            ext = os.path.splitext(self.path)[1].lower()
            if "not recognized as a supported file format" in str(e) and ext not in _RASTER_EXTENSIONS:
                raise InputError(f"'{name}' is not a raster that GDAL can read.") from None
            raise InputError(
                f"The raster '{name}' cannot be opened: the file looks corrupted or truncated ({_short(e)})."
            ) from None
        except RasterioError as e:  # pragma: no cover - other rasterio failures
            raise InputError(f"The raster '{name}' cannot be opened ({_short(e)}).") from None
        try:
            self._init(bands)
        except BaseException:
            self.close()
            raise

    # -- set-up ----------------------------------------------------------------------------------------------
    def _init(self, bands: Optional[Sequence[int]]) -> None:
        ds = self._ds
        name = os.path.basename(self.path)
        if ds.count < 1 or ds.width < 1 or ds.height < 1:
            raise InputError(f"'{name}' has no raster bands; choose an image file.")
        t = ds.transform
        if t.b != 0 or t.d != 0:
            raise InputError(
                f"The raster '{name}' has a rotated or sheared georeferencing; warp it to a north-up grid first "
                "(Raster > Projections > Warp, or gdalwarp)."
            )
        if t.a == 0 or t.e == 0:
            raise InputError(f"The raster '{name}' has a georeferencing with a pixel size of 0.")
        gcps, _ = ds.gcps
        self.crs = ds.crs if ds.crs else None
        identity = t == rasterio.Affine.identity()
        if gcps and (self.crs is None or identity):
            raise InputError(
                f"The raster '{name}' is georeferenced by ground control points only; warp it to a north-up grid "
                "first (Raster > Projections > Warp, or gdalwarp)."
            )
        self.georeferenced = self.crs is not None or not identity
        if not self.georeferenced:
            t = PIXEL_FRAME
        self.width, self.height, self.count = ds.width, ds.height, ds.count
        self.transform = t
        self.res = (abs(t.a), abs(t.e))
        self.bounds = rasterio.coords.BoundingBox(*rasterio.transform.array_bounds(ds.height, ds.width, t))
        self.bands = self._choose_bands(bands)
        self.dtype = ds.dtypes[self.bands[0] - 1]
        self.nodata = ds.nodatavals[self.bands[0] - 1]
        self._palette = None
        if len(self.bands) == 1 and self.dtype == "uint8":
            if ds.colorinterp[self.bands[0] - 1] == ColorInterp.palette:
                try:
                    cmap = ds.colormap(self.bands[0])
                    lut = np.zeros((256, 3), np.uint8)
                    for k, rgba in cmap.items():
                        if 0 <= k < 256:
                            lut[k] = rgba[:3]
                    self._palette = lut
                except ValueError:
                    self._palette = None
        self._probe()
        self.stretch = self._compute_stretch()

    def _choose_bands(self, bands: Optional[Sequence[int]]) -> Tuple[int, ...]:
        ds = self._ds
        name = os.path.basename(self.path)
        if bands is None or len(bands) == 0:
            ci = ds.colorinterp
            usable = [i + 1 for i in range(ds.count) if ci[i] != ColorInterp.alpha] or [1]
            return tuple(usable[:3])
        bands = tuple(int(b) for b in bands)
        if len(bands) > 3:
            raise InputError(f"Choose 1, 2 or 3 bands, not {len(bands)}.")
        bad = [b for b in bands if not 1 <= b <= ds.count]
        if bad:
            raise InputError(
                f"Band {bad[0]} does not exist in '{name}', which has {ds.count} band(s) (bands count from 1)."
            )
        return bands

    def _probe(self) -> None:
        """Read the first and the last pixel so that a truncated file fails here with a clear sentence."""
        for col, row in ((0, 0), (self.width - 1, self.height - 1)):
            try:
                self._ds.read(self.bands[0], window=Window(col, row, 1, 1))
            except _READ_ERRORS as e:
                raise InputError(
                    f"The raster '{os.path.basename(self.path)}' cannot be read: the file looks corrupted or "
                    f"truncated ({_short(e)})."
                ) from None

    def _sample(self, band: int) -> np.ndarray:
        """Valid values of one band from an overview, a decimated read or a grid of windows (1-D float64)."""
        ds = self._ds
        w, h = self.width, self.height
        ovr = ds.overviews(band)
        # the coarsest overview that keeps >= 512 pixels on the longer side (1 = the full-resolution band)
        f = max([o for o in ovr if max(w, h) / o >= 512] or [1])
        if (w / f) * (h / f) <= STATS_SAMPLE_ABOVE:
            # one decimated read of at most STATS_SIZE pixels a side; GDAL serves it from that overview
            s = min(1.0, STATS_SIZE / max(w, h))
            shape = (max(1, int(round(h * s))), max(1, int(round(w * s))))
            arrs = [ds.read(band, out_shape=shape, masked=True, resampling=Resampling.nearest)]
        else:
            # large and without a small overview: a grid of small windows, never decoding the whole raster
            arrs = []
            n = STATS_GRID
            for i in range(n):
                for j in range(n):
                    r = int((i + 0.5) * h / n - STATS_WINDOW / 2)
                    c = int((j + 0.5) * w / n - STATS_WINDOW / 2)
                    win = Window(max(0, c), max(0, r), min(STATS_WINDOW, w), min(STATS_WINDOW, h))
                    arrs.append(ds.read(band, window=win, masked=True))
        vals = []
        for a in arrs:
            data = np.ma.getdata(a).astype(np.float64, copy=False)
            ok = ~np.ma.getmaskarray(a) & np.isfinite(data)
            vals.append(data[ok])
        return np.concatenate(vals) if vals else np.zeros(0)

    def _compute_stretch(self) -> Optional[Tuple[Tuple[float, float], ...]]:
        if self.dtype == "uint8":
            return None
        out = []
        for b in self.bands:
            try:
                v = self._sample(b)
            except _READ_ERRORS as e:
                raise InputError(
                    f"The raster '{os.path.basename(self.path)}' cannot be read: the file looks corrupted "
                    f"({_short(e)})."
                ) from None
            if v.size == 0:
                lo, hi = 0.0, 1.0
            else:
                lo, hi = (float(x) for x in np.percentile(v, PERCENTILES))
                if not hi > lo:
                    lo, hi = float(v.min()), float(v.max())
                if not hi > lo:
                    hi = lo + 1.0
            out.append((lo, hi))
        return tuple(out)

    # -- reading ---------------------------------------------------------------------------------------------
    def window_transform(self, window: WindowLike, out_shape: Optional[Tuple[int, int]] = None):
        """Affine transform of ``window`` read at ``out_shape`` (rows, cols); without out_shape, native pixels."""
        window = as_window(window)
        t = rasterio.windows.transform(window, self.transform)
        if out_shape is not None:
            t = t * rasterio.Affine.scale(window.width / out_shape[1], window.height / out_shape[0])
        return t

    def read_rgb8(
        self,
        window: Optional[WindowLike] = None,
        out_shape: Optional[Tuple[int, int]] = None,
        resampling: Resampling = Resampling.bilinear,
    ) -> Tuple[np.ndarray, np.ndarray]:
        """Read ``window`` (raster pixels; None = the whole raster, only for small ones) as 8-bit RGB.

        out_shape: ``(rows, cols)`` to resample to; None = the window's size. A window reaching outside the
        raster reads the outside as invalid.
        Returns ``(rgb, valid)``: ``rgb`` HxWx3 uint8 (C-contiguous), ``valid`` HxW bool.
        """
        ds = self._ds
        if window is None:
            window = Window(0, 0, self.width, self.height)
        window = as_window(window)
        if out_shape is None:
            out_shape = (int(round(window.height)), int(round(window.width)))
        oh, ow = int(out_shape[0]), int(out_shape[1])
        if oh < 1 or ow < 1:
            raise ValueError(f"empty out_shape {out_shape}")
        inside = (
            window.col_off >= 0
            and window.row_off >= 0
            and window.col_off + window.width <= self.width
            and window.row_off + window.height <= self.height
        )
        uniq = tuple(dict.fromkeys(self.bands))
        try:
            data = ds.read(
                indexes=list(uniq), window=window, out_shape=(len(uniq), oh, ow), resampling=resampling,
                boundless=not inside,
            )
            masks = ds.read_masks(
                indexes=list(uniq), window=window, out_shape=(len(uniq), oh, ow),
                resampling=Resampling.nearest, boundless=not inside,
            )
        except _READ_ERRORS as e:
            raise InputError(
                f"The raster '{os.path.basename(self.path)}' could not be read near pixel "
                f"({int(window.col_off)}, {int(window.row_off)}): the file may be corrupted ({_short(e)})."
            ) from None
        valid = (masks > 0).any(axis=0)
        if data.dtype.kind == "f":
            valid &= ~np.isnan(data).any(axis=0)
        chans = {b: data[i] for i, b in enumerate(uniq)}
        if self._palette is not None:
            rgb = self._palette[chans[self.bands[0]]]
        else:
            stretched = []
            for k, b in enumerate(self.bands):
                stretched.append(self._to8(chans[b], k))
            if len(stretched) == 1:
                stretched = stretched * 3
            elif len(stretched) == 2:
                mean = ((stretched[0].astype(np.uint16) + stretched[1]) // 2).astype(np.uint8)
                stretched = [stretched[0], stretched[1], mean]
            rgb = np.stack(stretched, axis=-1)
        rgb = np.ascontiguousarray(rgb, dtype=np.uint8)
        rgb[~valid] = 0
        return rgb, valid

    def _to8(self, band: np.ndarray, k: int) -> np.ndarray:
        if self.stretch is None:
            return band.astype(np.uint8, copy=False)
        lo, hi = self.stretch[k]
        x = (band.astype(np.float32) - np.float32(lo)) * np.float32(255.0 / (hi - lo))
        x = np.nan_to_num(x, nan=0.0, posinf=255.0, neginf=0.0)
        return (np.clip(x, 0.0, 255.0) + 0.5).astype(np.uint8)

    def ground_pixel_size(self) -> Optional[Tuple[float, float]]:
        """Metres on the ground per pixel (x, y) at the raster's centre; None without a usable CRS."""
        return ground_pixel_size(self.crs, self.transform, self.width, self.height)

    @property
    def name(self) -> str:
        """The file name without folder and extension."""
        return os.path.splitext(os.path.basename(self.path))[0]

    @property
    def crs_wkt(self) -> str:
        return self.crs.to_wkt() if self.crs is not None else ""

    def close(self) -> None:
        if self._ds is not None:
            self._ds.close()
            self._ds = None

    def __enter__(self) -> "RasterSource":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self) -> None:  # pragma: no cover - best effort
        try:
            self.close()
        except Exception:  # noqa: BLE001
            pass

    def __repr__(self) -> str:
        return (
            f"RasterSource({os.path.basename(self.path)!r}, {self.width}x{self.height}, bands={self.bands}, "
            f"dtype={self.dtype}, crs={self.crs.to_string() if self.crs else None})"
        )


def _short(e: BaseException) -> str:
    s = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    return s if len(s) <= 160 else s[:157] + "..."
