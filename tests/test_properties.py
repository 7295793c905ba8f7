"""Property-based tests: raster -> tiles -> stitched map -> polygons, for random sizes, grids and transforms."""

import os
import tempfile

import numpy as np
import pytest
import rasterio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from rasterio import Affine
from rasterio.features import rasterize
from shapely.geometry import box
from shapely.ops import unary_union

from core.raster import RasterSource
from core.tiling import ProbabilityStitcher, TileGrid, read_tiles
from core.vectorize import vectorize

SETTINGS = dict(deadline=None, suppress_health_check=[HealthCheck.too_slow])

CRS_CHOICES = {
    # crs: (origin x range, origin y range, pixel size range, planar area?)
    "EPSG:32616": ((200_000.0, 800_000.0), (1_000_000.0, 5_000_000.0), (0.05, 30.0), True),
    "EPSG:2056": ((2_500_000.0, 2_800_000.0), (1_100_000.0, 1_300_000.0), (0.05, 30.0), True),
    "EPSG:3857": ((-1.5e7, 1.5e7), (-7e6, 7e6), (0.05, 30.0), False),
    "EPSG:4326": ((-170.0, 160.0), (-60.0, 70.0), (1e-6, 1e-3), False),
}


@st.composite
def scenes(draw, max_side=140):
    """A random binary mask (rectangles + speckle) on a random north-up (or south-up) grid."""
    h = draw(st.integers(4, max_side))
    w = draw(st.integers(4, max_side))
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    mask = np.zeros((h, w), bool)
    for _ in range(draw(st.integers(0, 8))):
        r0, c0 = rng.integers(0, h), rng.integers(0, w)
        mask[r0 : r0 + rng.integers(1, h // 2 + 2), c0 : c0 + rng.integers(1, w // 2 + 2)] ^= True
    mask |= rng.random((h, w)) < draw(st.sampled_from([0.0, 0.01, 0.1]))
    crs = draw(st.sampled_from(sorted(CRS_CHOICES)))
    (x0, x1), (y0, y1), (p0, p1), _ = CRS_CHOICES[crs]
    px = draw(st.floats(p0, p1))
    py = px * draw(st.floats(0.5, 2.0))
    north_up = draw(st.booleans()) or crs == "EPSG:4326"
    ox = draw(st.floats(x0, x1))
    oy = draw(st.floats(y0, y1))
    t = Affine(px, 0, ox, 0, -py if north_up else py, oy)
    tile = draw(st.integers(16, 96))
    overlap = draw(st.integers(0, tile // 2 - 1))
    return mask, t, crs, tile, overlap


def _write(mask, t, crs, folder):
    path = os.path.join(folder, "mask.tif")
    with rasterio.open(path, "w", driver="GTiff", width=mask.shape[1], height=mask.shape[0], count=1,
                       dtype="uint8", transform=t, crs=crs) as dst:
        dst.write((mask * 255).astype(np.uint8), 1)
    return path


def _stitch_from_raster(path, tile, overlap):
    """Tiles read from the raster as the model's input, the red channel taken as the 'prediction'."""
    src = RasterSource(path)
    g = TileGrid(src.width, src.height, tile, overlap)
    st_ = ProbabilityStitcher(src.width, src.height, feather=g.feather)
    for t_, rgb, valid in read_tiles(src, g):
        st_.add(t_.window, rgb[..., 0] / 255.0, valid)
    return src, st_


@settings(max_examples=40, **SETTINGS)
@given(scenes())
def test_polygons_cover_exactly_the_mask(scene):
    mask, t, crs, tile, overlap = scene
    with tempfile.TemporaryDirectory() as tmp:
        src, stitcher = _stitch_from_raster(_write(mask, t, crs, tmp), tile, overlap)
        with src, stitcher:
            assert src.transform == t
            prob = stitcher.finalize()
            # no seam: the blended map is the mask itself
            np.testing.assert_allclose(prob, mask.astype(np.float32), atol=1e-5)
            dets = vectorize(prob, src.transform, src.crs, threshold=0.5, fill_holes=False)
    pixel_area = abs(t.a * t.e)
    assert sum(d.pixels for d in dets) == mask.sum()
    frame = box(*rasterio.transform.array_bounds(mask.shape[0], mask.shape[1], t))
    tol = 1e-9 * max(abs(t.c), abs(t.f), 1.0)
    for d in dets:
        assert d.geometry.is_valid and d.geometry.area > 0
        assert frame.buffer(tol).covers(d.geometry)  # nothing outside the raster
        assert d.geometry.area == pytest.approx(d.pixels * pixel_area, rel=1e-6)
        assert d.area_unit == "m2" and d.area > 0
        if CRS_CHOICES[crs][3]:
            assert d.area == pytest.approx(d.pixels * pixel_area, rel=1e-6)
        assert 0.5 <= d.score <= 1.0 + 1e-6
    if dets:
        # polygons do not overlap and rasterise back to exactly the mask
        union = unary_union([d.geometry for d in dets])
        assert union.area == pytest.approx(sum(d.geometry.area for d in dets), rel=1e-6)
        back = rasterize([(d.geometry, 1) for d in dets], out_shape=mask.shape, transform=t, dtype="uint8")
        np.testing.assert_array_equal(back.astype(bool), mask)
    else:
        assert not mask.any()


@settings(max_examples=30, **SETTINGS)
@given(scenes(), st.floats(0.5, 2.0))
def test_simplified_area_within_one_pixel_per_boundary_cell(scene, tol):
    mask, t, crs, tile, overlap = scene
    dets = vectorize(mask.astype(np.float32), t, None, simplify=tol, fill_holes=False)
    padded = np.pad(mask, 1)
    inner = padded[1:-1, 1:-1] & padded[:-2, 1:-1] & padded[2:, 1:-1] & padded[1:-1, :-2] & padded[1:-1, 2:]
    boundary_cells = int((mask & ~inner).sum())
    pixel_area = abs(t.a * t.e)
    total = sum(d.geometry.area for d in dets) / pixel_area
    assert abs(total - mask.sum()) <= boundary_cells + 1e-6
    frame = box(*rasterio.transform.array_bounds(mask.shape[0], mask.shape[1], t))
    assert all(frame.buffer(1e-9 * max(abs(t.c), abs(t.f), 1.0)).covers(d.geometry) for d in dets)
    assert all(d.geometry.is_valid for d in dets)


@settings(max_examples=40, **SETTINGS)
@given(
    st.integers(8, 300), st.integers(8, 300), st.integers(16, 128), st.floats(0, 0.49), st.floats(0.3, 3.0),
    st.floats(0, 1),
)
def test_resampled_tiles_blend_without_seams(w, h, tile, ov_frac, scale, alpha):
    """Tiles at another resolution (scale) predicting a linear field: the stitched map is that field."""
    overlap = min(int(tile * ov_frac), tile // 2 - 1)
    g = TileGrid(w, h, tile, overlap, scale)
    sx, sy = 0.8 * alpha / w, 0.8 * (1 - alpha) / h

    def field(x, y):
        return 0.1 + sx * x + sy * y

    with ProbabilityStitcher(w, h, feather=g.feather) as stch:
        for t in g:
            win, (oh, ow) = t.window, t.out_shape
            # the field at the centres of the tile's pixels, in target pixel coordinates
            xs = win.col_off + (np.arange(ow) + 0.5) * win.width / ow - 0.5
            ys = win.row_off + (np.arange(oh) + 0.5) * win.height / oh - 0.5
            stch.add(win, field(xs[None, :], ys[:, None]).astype(np.float32))
        m = np.array(stch.finalize())
    yy, xx = np.mgrid[0:h, 0:w]
    err = np.abs(m - field(xx, yy))
    # exact inside; within a pixel of a window edge bilinear resampling clamps instead of extrapolating
    step = max(scale, 1.0)
    assert err.max() <= (sx + sy) * (step + 1) + 1e-5
    # and a constant is exactly constant everywhere: the blend is a partition of unity
    with ProbabilityStitcher(w, h, feather=g.feather) as stch:
        for t in g:
            stch.add(t.window, np.full(t.out_shape, 0.7, np.float32))
        np.testing.assert_allclose(stch.finalize(), 0.7, atol=1e-6)


@settings(max_examples=60, **SETTINGS)
@given(st.integers(1, 20000), st.integers(1, 20000), st.integers(512, 1024), st.floats(0, 0.49),
       st.floats(0.25, 8.0))
def test_grid_windows_cover_the_raster_and_stay_inside(w, h, tile, ov_frac, scale):
    overlap = min(int(tile * ov_frac), tile // 2 - 1)
    g = TileGrid(w, h, tile, overlap, scale)
    cols = sorted({t.window.col_off for t in g})
    rows = sorted({t.window.row_off for t in g})
    for starts, length in ((cols, w), (rows, h)):
        size = min(g.window_size, length)
        assert starts[0] == 0 and starts[-1] + size == length
        for a, b in zip(starts, starts[1:]):
            assert 0 < b - a and a + size - b >= g.overlap_px  # contiguous cover with the overlap
    for t in g:
        assert t.window.width == min(g.window_size, w) and t.window.height == min(g.window_size, h)
        assert t.out_shape[0] >= 1 and t.out_shape[1] >= 1
