"""Tile grid over a target raster and the on-disk probability map the tiles are blended into.

Units: every window is in pixels of the *target* raster (integers). ``scale`` is the number of target pixels per
tile pixel: ``scale = reference ground pixel size / target ground pixel size`` (see :func:`resolution_scale`).
A tile covers a window of ``round(tile_size * scale)`` target pixels a side, read resampled to ``tile_size``
pixels (``Tile.out_shape``), so objects appear at the reference's ground resolution to the model. Its
prediction (``out_shape``) is resampled back to the window (bilinear) when it is added to the stitcher, so the
probability map always has the target raster's size and grid, and polygons come out on the target's grid.

Typical use (what ``core.pipeline`` does)::

    grid = TileGrid(src.width, src.height, tile_size=1024, overlap=128, scale=s)
    with ProbabilityStitcher(src.width, src.height, feather=grid.feather) as st:
        for tile, rgb, valid in read_tiles(src, grid):       # all-nodata tiles are skipped
            st.add(tile.window, predict(rgb), valid)
        polys = vectorize(st.finalize(), src.transform, ...)
"""

from __future__ import annotations

import functools
import math
import os
import tempfile
from dataclasses import dataclass
from typing import Callable, Iterator, List, Optional, Tuple

import numpy as np
from rasterio.windows import Window

from .errors import CancelledError
from .raster import RasterSource, WindowLike, as_window


@dataclass(frozen=True)
class Tile:
    """One tile: ``window`` in target pixels, read at ``out_shape`` = (rows, cols) tile pixels."""

    index: int
    row: int
    col: int
    window: Window
    out_shape: Tuple[int, int]


def _starts(length: int, size: int, overlap: int) -> List[int]:
    """Start offsets of windows of ``size`` along ``length``, overlapping by at least ``overlap``.

    The first window starts at 0, the last one is flush with the end, and the ones between are spread evenly, so
    the extra overlap is shared by all tiles instead of piling up in the last one. As few windows as a regular
    step of ``size - overlap`` with a flush last window would need.
    """
    if length <= size:
        return [0]
    n = int(math.ceil((length - overlap) / float(size - overlap)))
    n = max(n, 2)
    return [int(round(i * (length - size) / (n - 1))) for i in range(n)]


class TileGrid:
    """Overlapping tiles covering a ``width`` x ``height`` raster.

    tile_size, overlap: in tile pixels (the model's input size); ``0 <= overlap < tile_size / 2``.
    scale: target pixels per tile pixel (> 0). Windows are ``round(tile_size * scale)`` target pixels a side and
    overlap by at least ``round(overlap * scale)``; the first and last rows and columns of tiles are flush with
    the raster's edges and the ones between evenly spread; a raster smaller than one window gives one smaller
    tile (``out_shape`` then smaller than tile_size, but at least 2 pixels a side: what the model takes).
    """

    def __init__(self, width: int, height: int, tile_size: int = 1024, overlap: int = 128, scale: float = 1.0):
        if width < 1 or height < 1:
            raise ValueError("empty raster")
        if tile_size < 1 or overlap < 0 or 2 * overlap >= tile_size:
            raise ValueError("need tile_size >= 1 and 0 <= overlap < tile_size / 2")
        if not (scale > 0 and math.isfinite(scale)):
            raise ValueError("scale must be a positive number")
        self.width, self.height = int(width), int(height)
        self.tile_size, self.overlap, self.scale = int(tile_size), int(overlap), float(scale)
        self.window_size = max(1, int(round(tile_size * scale)))
        self.overlap_px = min(int(round(overlap * scale)), (self.window_size - 1) // 2)
        cols = _starts(self.width, self.window_size, self.overlap_px)
        rows = _starts(self.height, self.window_size, self.overlap_px)
        self.n_rows, self.n_cols = len(rows), len(cols)
        tiles = []
        for i, r in enumerate(rows):
            h = min(self.window_size, self.height - r)
            for j, c in enumerate(cols):
                w = min(self.window_size, self.width - c)
                tiles.append(Tile(len(tiles), i, j, Window(c, r, w, h), (self._out(h), self._out(w))))
        self.tiles: List[Tile] = tiles

    def _out(self, n: int) -> int:
        if n == self.window_size:
            return self.tile_size
        return max(2, int(round(n / self.scale)))  # the model takes images of 2 x 2 pixels or more

    @property
    def feather(self) -> int:
        """Width in target pixels of the blending ramp at tile borders (the overlap), for ProbabilityStitcher."""
        return max(1, self.overlap_px)

    def __len__(self) -> int:
        return len(self.tiles)

    def __iter__(self) -> Iterator[Tile]:
        return iter(self.tiles)

    def __getitem__(self, i: int) -> Tile:
        return self.tiles[i]


def resolution_scale(
    target_pixel_size: Optional[Tuple[float, float]],
    reference_pixel_size: Optional[Tuple[float, float]],
    tolerance: float = 0.05,
) -> float:
    """Target pixels per tile pixel so that tiles have the reference's ground resolution.

    Both sizes are ground metres per pixel (x, y) as from ``RasterSource.ground_pixel_size()``; when either is
    unknown (no CRS) the scale is 1 (no resampling). Ratios within ``tolerance`` of 1 are snapped to 1, so
    rasters from the same source are never resampled needlessly.
    """
    if not target_pixel_size or not reference_pixel_size:
        return 1.0
    t = math.sqrt(target_pixel_size[0] * target_pixel_size[1])
    r = math.sqrt(reference_pixel_size[0] * reference_pixel_size[1])
    if not (t > 0 and r > 0 and math.isfinite(t) and math.isfinite(r)):
        return 1.0
    s = r / t
    return 1.0 if abs(s - 1.0) <= tolerance else s


def read_tiles(
    src: RasterSource,
    grid: TileGrid,
    skip_empty: bool = True,
    is_cancelled: Optional[Callable[[], bool]] = None,
) -> Iterator[Tuple[Tile, np.ndarray, np.ndarray]]:
    """Yield ``(tile, rgb HxWx3 uint8, valid HxW bool)`` for each tile, read resampled to ``tile.out_shape``.

    Tiles without any valid pixel are skipped when ``skip_empty``. Raises CancelledError when ``is_cancelled()``.
    """
    for tile in grid:
        if is_cancelled is not None and is_cancelled():
            raise CancelledError()
        rgb, valid = src.read_rgb8(tile.window, out_shape=tile.out_shape)
        if skip_empty and not valid.any():
            continue
        yield tile, rgb, valid


# -- resampling -------------------------------------------------------------------------------------------------
def _axis(n_src: int, n_dst: int) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Indices and weights for 1-D linear resampling with pixel-centre alignment (GDAL's convention)."""
    x = (np.arange(n_dst, dtype=np.float64) + 0.5) * (n_src / n_dst) - 0.5
    x = np.clip(x, 0, n_src - 1)
    i0 = np.floor(x).astype(np.intp)
    i1 = np.minimum(i0 + 1, n_src - 1)
    return i0, i1, (x - i0).astype(np.float32)


def resize_bilinear(a: np.ndarray, shape: Tuple[int, int]) -> np.ndarray:
    """Resample a 2-D array to ``shape`` (rows, cols) bilinearly, pixel centres aligned; float32 out."""
    a = np.asarray(a, dtype=np.float32)
    h, w = int(shape[0]), int(shape[1])
    if a.shape == (h, w):
        return a
    r0, r1, fr = _axis(a.shape[0], h)
    c0, c1, fc = _axis(a.shape[1], w)
    rows = a[r0] * (1 - fr)[:, None] + a[r1] * fr[:, None]
    return rows[:, c0] * (1 - fc)[None, :] + rows[:, c1] * fc[None, :]


def resize_nearest(a: np.ndarray, shape: Tuple[int, int]) -> np.ndarray:
    """Resample a 2-D array to ``shape`` (rows, cols) by nearest neighbour, pixel centres aligned."""
    h, w = int(shape[0]), int(shape[1])
    if a.shape == (h, w):
        return a
    r = np.minimum(((np.arange(h) + 0.5) * a.shape[0] / h).astype(np.intp), a.shape[0] - 1)
    c = np.minimum(((np.arange(w) + 0.5) * a.shape[1] / w).astype(np.intp), a.shape[1] - 1)
    return a[r][:, c]


@functools.lru_cache(maxsize=8)
def _feather_cached(h: int, w: int, feather: int) -> np.ndarray:
    a = feather_weights((h, w), feather)
    a.flags.writeable = False
    return a


def feather_weights(shape: Tuple[int, int], feather: int) -> np.ndarray:
    """Separable blending weight of a window: a linear ramp from ~0 to 1 over ``feather`` pixels at each border.

    Neighbouring tiles' ramps cross-fade in their overlap, so no seam is visible where they meet. Never 0, so a
    pixel covered by a single tile keeps that tile's value after normalisation.
    """

    def ramp(n: int) -> np.ndarray:
        f = max(1, min(int(feather), (n + 1) // 2))
        i = np.arange(n, dtype=np.float32)
        return np.minimum(1.0, np.minimum(i + 0.5, n - i - 0.5) / f).astype(np.float32)

    return ramp(int(shape[0]))[:, None] * ramp(int(shape[1]))[None, :]


# -- stitching --------------------------------------------------------------------------------------------------
class ProbabilityStitcher:
    """A full-size float32 probability map on disk, blended from overlapping tile predictions.

    ``ProbabilityStitcher(width, height, path=None, feather=None, keep=False)``

    path:    the file of the map (a raw float32 ``np.memmap``, rows x cols); None = a temporary file in the
             system's temp folder. A second file ``path + ".weights"`` holds the summed weights while tiles are
             added. Both are deleted by :meth:`close` (also on exceptions inside ``with``), unless ``keep``.
    feather: blending ramp in target pixels (``TileGrid.feather``); None = a quarter of each window's side.

    :meth:`add` accumulates ``weight * prob`` and ``weight``; :meth:`finalize` divides (in row blocks) and returns
    the map (an ``np.memmap``, H x W float32 in [0, 1]); pixels no tile covered (skipped all-nodata tiles) are 0.
    Disk use: 8 bytes per pixel while adding, 4 after finalize (16384 x 16384: 2 GiB, then 1 GiB).
    """

    BLOCK_ROWS = 1024

    def __init__(
        self,
        width: int,
        height: int,
        path: Optional[str] = None,
        feather: Optional[int] = None,
        keep: bool = False,
    ) -> None:
        self.width, self.height = int(width), int(height)
        self.feather = feather
        self.keep = keep
        self._finalized = False
        self._closed = False
        self._files: List[str] = []
        if path is None:
            fd, path = tempfile.mkstemp(prefix="virefsam_prob_", suffix=".f32")
            os.close(fd)
        self.path = str(path)
        self._files.append(self.path)
        self._wpath = self.path + ".weights"
        self._files.append(self._wpath)
        try:
            shape = (self.height, self.width)
            self._acc = np.memmap(self.path, dtype=np.float32, mode="w+", shape=shape)
            self._w = np.memmap(self._wpath, dtype=np.float32, mode="w+", shape=shape)
        except BaseException:
            self._remove_files()
            raise

    def add(self, window: WindowLike, prob: np.ndarray, valid: Optional[np.ndarray] = None) -> None:
        """Blend one tile's probabilities into the map.

        window: the tile's window in target pixels (integers, inside the raster).
        prob:   HxW float probabilities in [0, 1], of the window's size or of the tile's ``out_shape`` (then
                resampled bilinearly to the window).
        valid:  optional HxW bool (either shape); invalid (nodata) pixels get probability 0.
        """
        if self._finalized:
            raise RuntimeError("add() after finalize()")
        w = as_window(window)
        c0, r0 = int(round(w.col_off)), int(round(w.row_off))
        ww, wh = int(round(w.width)), int(round(w.height))
        if c0 < 0 or r0 < 0 or c0 + ww > self.width or r0 + wh > self.height or ww < 1 or wh < 1:
            raise ValueError(f"window {w} outside the {self.width}x{self.height} map")
        p = np.asarray(prob, dtype=np.float32)
        if p.ndim != 2:
            raise ValueError(f"prob must be 2-D, got shape {p.shape}")
        p = resize_bilinear(p, (wh, ww))
        p = np.nan_to_num(np.clip(p, 0.0, 1.0), nan=0.0)
        if valid is not None:
            v = resize_nearest(np.asarray(valid, dtype=bool), (wh, ww))
            p = np.where(v, p, np.float32(0.0))
        feather = self.feather if self.feather is not None else max(1, min(wh, ww) // 4)
        wt = _feather_cached(wh, ww, int(feather))
        sl = (slice(r0, r0 + wh), slice(c0, c0 + ww))
        self._acc[sl] += wt * p
        self._w[sl] += wt

    def finalize(self) -> np.memmap:
        """Normalise the blend and return the probability map (H x W float32 memmap). Idempotent."""
        if not self._finalized:
            for r in range(0, self.height, self.BLOCK_ROWS):
                sl = slice(r, min(self.height, r + self.BLOCK_ROWS))
                w = np.asarray(self._w[sl])
                a = np.asarray(self._acc[sl])
                self._acc[sl] = np.where(w > 0, a / np.where(w > 0, w, 1.0), 0.0).astype(np.float32)
            self._acc.flush()
            del self._w
            self._try_remove(self._wpath)
            self._finalized = True
        return self._acc

    @property
    def array(self) -> np.memmap:
        """The finalized map (calls :meth:`finalize`)."""
        return self.finalize()

    def to_geotiff(self, path: str, transform, crs=None) -> str:
        """Write the finalized map as a float32 tiled, deflate-compressed GeoTIFF (row blocks); returns path."""
        import rasterio

        m = self.finalize()
        profile = dict(
            driver="GTiff", width=self.width, height=self.height, count=1, dtype="float32", transform=transform,
            crs=crs, compress="deflate", tiled=True, blockxsize=256, blockysize=256, BIGTIFF="IF_SAFER",
        )
        if self.width < 256 or self.height < 256:
            profile.update(tiled=False)
            profile.pop("blockxsize")
            profile.pop("blockysize")
        with rasterio.open(path, "w", **profile) as dst:
            for r in range(0, self.height, self.BLOCK_ROWS):
                h = min(self.BLOCK_ROWS, self.height - r)
                dst.write(np.asarray(m[r : r + h]), 1, window=Window(0, r, self.width, h))
        return path

    # -- clean-up --------------------------------------------------------------------------------------------
    @staticmethod
    def _try_remove(p: str) -> None:
        try:
            os.remove(p)
        except FileNotFoundError:
            pass
        except OSError:  # pragma: no cover - still mapped (Windows): retry when Python exits
            import atexit

            atexit.register(lambda: os.path.exists(p) and os.remove(p))

    def _remove_files(self) -> None:
        for p in self._files:
            self._try_remove(p)

    def close(self) -> None:
        """Release the memmaps and delete the files (unless ``keep``). Safe to call twice."""
        if self._closed:
            return
        self._closed = True
        # Drop our references; on POSIX a deleted file's space is freed once the last mapping goes away, so an
        # array returned by finalize() stays readable while the caller still holds it.
        for name in ("_acc", "_w"):
            m = self.__dict__.pop(name, None)
            if m is not None and name == "_acc" and self._finalized:
                m.flush()
        if self.keep and self._finalized:
            return
        self._remove_files()

    def __enter__(self) -> "ProbabilityStitcher":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            self.keep = False
        self.close()

    def __del__(self) -> None:  # pragma: no cover - best effort
        try:
            if not self.__dict__.get("_closed", True):
                self.close()
        except Exception:  # noqa: BLE001
            pass


def tile_job(src, tile, predict: Callable[[np.ndarray], np.ndarray], stage=None):
    """One tile: ``(prob HxW float32 in [0, 1], valid HxW bool)`` at ``tile.out_shape``, or None when the tile has
    no valid pixel. ``src`` a :class:`core.raster.RasterSource`; ``stage(name)`` times "read" and "predict"."""
    from contextlib import nullcontext

    timer = stage or (lambda name: nullcontext())
    with timer("read"):
        rgb, valid = src.read_rgb8(tile.window, out_shape=tile.out_shape)
    if not valid.any():
        return None
    with timer("predict"):
        prob = predict(rgb)
    return prob, valid
