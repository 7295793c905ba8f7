"""Tile grid, resampling to the reference's resolution, and seam-free stitching on real building masks."""

import os

import numpy as np
import pytest
import rasterio
from rasterio.enums import Resampling
from rasterio.windows import Window
from scipy import ndimage
from shapely.geometry import box

from core.raster import RasterSource
from core.tiling import (
    ProbabilityStitcher,
    TileGrid,
    read_tiles,
    resize_bilinear,
    resolution_scale,
)
from core.vectorize import vectorize


def _coverage(grid):
    cov = np.zeros((grid.height, grid.width), np.int32)
    for t in grid:
        w = t.window
        cov[w.row_off : w.row_off + w.height, w.col_off : w.col_off + w.width] += 1
    return cov


@pytest.mark.parametrize(
    "w,h,tile,ov,scale",
    [(2048, 2048, 512, 64, 1.0), (2000, 1100, 1024, 128, 1.0), (5000, 300, 256, 32, 1.0),
     (300, 200, 1024, 128, 1.0), (4096, 4096, 1024, 128, 0.37), (777, 1234, 256, 100, 2.5), (1, 1, 64, 0, 1.0)],
)
def test_grid_covers_raster_flush_with_edges(w, h, tile, ov, scale):
    g = TileGrid(w, h, tile, ov, scale)
    assert (_coverage(g) >= 1).all()
    ws = g.window_size
    assert ws == max(1, round(tile * scale))
    cols = sorted({t.window.col_off for t in g})
    rows = sorted({t.window.row_off for t in g})
    for t in g:
        win = t.window
        assert win.col_off >= 0 and win.row_off >= 0
        assert win.col_off + win.width <= w and win.row_off + win.height <= h
        assert win.width == min(ws, w) and win.height == min(ws, h)
        if win.width == ws and win.height == ws:
            assert t.out_shape == (tile, tile)
        else:
            assert t.out_shape == (max(2, round(win.height / scale)), max(2, round(win.width / scale)))
    # last column / row flush with the raster's edge, overlaps at least the requested one
    assert cols[-1] + min(ws, w) == w and rows[-1] + min(ws, h) == h
    for starts in (cols, rows):
        for a, b in zip(starts, starts[1:]):
            assert a + ws - b >= g.overlap_px
    assert len(g) == g.n_rows * g.n_cols


def test_small_raster_gives_one_smaller_tile():
    g = TileGrid(300, 200, 1024, 128)
    assert len(g) == 1 and g[0].window == Window(0, 0, 300, 200) and g[0].out_shape == (200, 300)
    g = TileGrid(300, 200, 1024, 128, scale=0.5)  # target coarser than the reference: upsampled
    assert len(g) == 1 and g[0].out_shape == (400, 600)


def test_resolution_scale_from_real_rasters(shared_data):
    z = shared_data / "oam_mosaics" / "zanzibar.tif"
    a = shared_data / "spacenet_atlanta" / "full" / "sample_geotiff.tif"
    b = shared_data / "oam_buildings" / "images" / "area1_OAM-1277174-1083983-21.tif"
    with RasterSource(str(z)) as zs, RasterSource(str(a)) as at, RasterSource(str(b)) as ob:
        assert resolution_scale(zs.ground_pixel_size(), zs.ground_pixel_size()) == 1.0
        # a 0.5 m target searched with a 7.4 cm reference: each tile covers ~0.149 x as many target pixels
        s = resolution_scale(at.ground_pixel_size(), zs.ground_pixel_size())
        assert s == pytest.approx(0.0740 / 0.49986, rel=0.01)
        # EPSG:4326 tile of the same z21 OAM pyramid as the EPSG:3857 mosaic: same ground resolution
        assert resolution_scale(ob.ground_pixel_size(), zs.ground_pixel_size()) == 1.0
    assert resolution_scale(None, (0.5, 0.5)) == 1.0


def test_resize_bilinear_is_exact_on_linear_fields():
    y, x = np.mgrid[0:40, 0:60].astype(np.float32)
    f = 0.3 * x + 0.7 * y + 2
    up = resize_bilinear(f, (80, 120))
    yy, xx = np.mgrid[0:80, 0:120].astype(np.float32)
    exact = 0.3 * ((xx + 0.5) / 2 - 0.5) + 0.7 * ((yy + 0.5) / 2 - 0.5) + 2
    np.testing.assert_allclose(up[1:-1, 1:-1], exact[1:-1, 1:-1], atol=1e-4)
    assert resize_bilinear(np.ones((7, 9)), (3, 20)).min() == 1.0


def test_stitcher_constant_tiles_skipped_tiles_and_nodata():
    g = TileGrid(1000, 700, 256, 48)
    with ProbabilityStitcher(1000, 700, feather=g.feather) as st:
        for t in g:
            if t.row == 1 and t.col == 1:
                continue  # a skipped (all-nodata) tile
            valid = np.ones(t.out_shape, bool)
            if t.index == 0:
                valid[:10, :10] = False
            st.add(t.window, np.full(t.out_shape, 0.8, np.float32), valid)
        m = st.finalize()
        skipped = g.tiles[g.n_cols + 1].window
        covered = np.zeros((700, 1000), bool)
        for t in g:
            if t.index != skipped and not (t.row == 1 and t.col == 1):
                w = t.window
                covered[w.row_off : w.row_off + w.height, w.col_off : w.col_off + w.width] = True
        assert (m[:10, :10] == 0).all()
        inner = covered.copy()
        inner[:10, :10] = False
        np.testing.assert_allclose(m[inner], 0.8, atol=1e-6)  # blending never changes a constant: no seam
        assert (m[~covered] == 0).all()
        assert isinstance(m, np.memmap) and m.dtype == np.float32 and m.shape == (700, 1000)


def test_stitcher_files_are_removed_on_close_and_on_error(tmp_path):
    st = ProbabilityStitcher(64, 64)
    path = st.path
    assert os.path.exists(path) and os.path.exists(path + ".weights")
    st.add((0, 0, 64, 64), np.ones((64, 64)))
    st.finalize()
    assert not os.path.exists(path + ".weights")
    st.close()
    assert not os.path.exists(path)
    target = tmp_path / "prob.f32"
    with pytest.raises(ZeroDivisionError):
        with ProbabilityStitcher(64, 64, path=str(target), keep=True) as st:
            st.add((0, 0, 32, 32), np.ones((32, 32)))
            1 / 0
    assert os.listdir(tmp_path) == []
    with ProbabilityStitcher(64, 64, path=str(target), keep=True) as st:
        st.add((0, 0, 64, 64), np.full((32, 32), 0.25))  # tile-resolution prediction, resampled up
        st.finalize()
    assert np.fromfile(target, np.float32).reshape(64, 64).mean() == pytest.approx(0.25)


def test_stitched_map_to_geotiff(tmp_path, shared_data):
    with rasterio.open(shared_data / "swiss_trees" / "masks" / "1091-322_00.tif") as ds:
        mask = ds.read(1).astype(np.float32)
        t, crs = ds.transform, ds.crs
    g = TileGrid(mask.shape[1], mask.shape[0], 64, 16)
    with ProbabilityStitcher(mask.shape[1], mask.shape[0], feather=g.feather) as st:
        for tile in g:
            w = tile.window
            st.add(w, mask[w.row_off : w.row_off + w.height, w.col_off : w.col_off + w.width])
        out = st.to_geotiff(str(tmp_path / "prob.tif"), t, crs)
    with rasterio.open(out) as ds:
        assert ds.crs == crs and ds.transform == t and ds.dtypes[0] == "float32"
        np.testing.assert_allclose(ds.read(1), mask, atol=1e-6)


def _mask_tiles(path, grid, offsets=None):
    """Read a real building mask tile by tile at the grid's out_shape (as a model's prediction would come)."""
    with rasterio.open(path) as ds:
        for t in grid:
            p = ds.read(1, window=t.window, out_shape=t.out_shape, resampling=Resampling.average,
                        out_dtype="float32")
            if offsets is not None:  # tile-dependent calibration, as a model gives at different contexts
                p = np.clip(p * 0.9 + offsets[t.index], 0, 1)
            yield t, p


def test_seam_building_across_tile_border_is_one_polygon(shared_data):
    path = shared_data / "oam_mosaics" / "kampala_buildings.tif"
    with rasterio.open(path) as ds:
        mask = ds.read(1).astype(bool)
        transform, crs = ds.transform, ds.crs
    g = TileGrid(mask.shape[1], mask.shape[0], 512, 64)
    offsets = np.random.default_rng(0).uniform(0.0, 0.08, len(g))
    with ProbabilityStitcher(mask.shape[1], mask.shape[0], feather=g.feather) as st:
        for t, p in _mask_tiles(path, g, offsets):
            st.add(t.window, p)
        prob = st.finalize()
        assert ((prob >= 0.5) == mask).all()
        dets = vectorize(prob, transform, crs, threshold=0.5)
    direct = vectorize(mask.astype(np.float32), transform, crs)
    assert len(dets) == len(direct)
    # a labelled building that crosses the border between the first two tile columns
    border = g[0].window.width  # first tile's right edge; the next tile starts before it (overlap)
    lab, n = ndimage.label(mask)
    sl = ndimage.find_objects(lab)
    crossing = [i + 1 for i, s in enumerate(sl)
                if s[1].start < g[1].window.col_off and s[1].stop > border and (lab == i + 1).sum() > 2000]
    assert crossing, "expected a building across the tile border"
    for k in crossing:
        rows, cols = np.nonzero(lab == k)
        r, c = rows[0], cols[0]
        x, y = transform * (c + 0.5, r + 0.5)
        pt = box(x - 1e-3, y - 1e-3, x + 1e-3, y + 1e-3)
        hits = [d for d in dets if d.geometry.intersects(pt)]
        assert len(hits) == 1
        assert hits[0].pixels == pytest.approx(ndimage.binary_fill_holes(lab == k).sum())
        # the polygon reaches both sides of the border
        x0, _, x1, _ = hits[0].geometry.bounds
        bx = (transform * (border, 0))[0]
        bx0 = (transform * (g[1].window.col_off, 0))[0]
        assert x0 < bx0 and x1 > bx


def test_seam_free_with_resolution_scale(shared_data):
    """Tiles read at half resolution (scale 2) and mapped back: buildings stay whole, map matches the mask."""
    path = shared_data / "oam_mosaics" / "kampala_buildings.tif"
    with rasterio.open(path) as ds:
        mask = ds.read(1).astype(bool)
        transform, crs = ds.transform, ds.crs
    g = TileGrid(mask.shape[1], mask.shape[0], 256, 32, scale=2.0)
    assert g.window_size == 512 and all(t.out_shape == (256, 256) for t in g)
    with ProbabilityStitcher(mask.shape[1], mask.shape[0], feather=g.feather) as st:
        for t, p in _mask_tiles(path, g):
            st.add(t.window, p)
        prob = st.finalize()
        pred = prob >= 0.5
        iou = (pred & mask).sum() / (pred | mask).sum()
        assert iou > 0.95
        dets = vectorize(prob, transform, crs, threshold=0.5, min_area=64)
    lab, n = ndimage.label(mask)
    sizes = ndimage.sum(mask, lab, range(1, n + 1))
    big = [i + 1 for i, s in enumerate(sizes) if s > 3000]
    for k in big[:25]:
        rows, cols = np.nonzero(ndimage.binary_erosion(lab == k, iterations=3))
        if rows.size == 0:
            continue
        x, y = transform * (cols[len(cols) // 2] + 0.5, rows[len(rows) // 2] + 0.5)
        assert sum(d.geometry.contains(box(x, y, x, y).centroid) for d in dets) == 1


def test_read_tiles_skips_all_nodata_tiles(tmp_path, shared_data):
    with rasterio.open(shared_data / "oam_mosaics" / "kampala.tif") as ds:
        data = ds.read(window=Window(0, 0, 600, 400))
        t = ds.window_transform(Window(0, 0, 600, 400))
        crs = ds.crs
    data[:, :, :300] = 0
    p = tmp_path / "half_nodata.tif"
    with rasterio.open(p, "w", driver="GTiff", width=600, height=400, count=3, dtype="uint8", transform=t,
                       crs=crs, nodata=0) as dst:
        dst.write(data)
    g = TileGrid(600, 400, 128, 16)
    with RasterSource(str(p)) as src:
        got = list(read_tiles(src, g))
        every = list(read_tiles(src, g, skip_empty=False))
    assert len(every) == len(g)
    assert 0 < len(got) < len(g)
    assert all(t.window.col_off + t.window.width > 300 for t, _, _ in got)
    assert all(v.any() for _, _, v in got)


def test_end_to_end_chain_with_a_coarser_reference(shared_data, tmp_path):
    """The pipeline's chain without a model: a 0.5 m reference (SpaceNet, EPSG:32616) searched in a 7.5 cm
    EPSG:3857 target: tiles read at the reference's resolution, 'predictions' (the real labels, read the same
    way) stitched at the target's resolution, vectorised once and written; polygons land on the buildings."""
    from osgeo import ogr

    from core.vectorize import to_features
    from core.writers import LayerData, write_layers

    target = shared_data / "oam_mosaics" / "kampala.tif"
    labels = shared_data / "oam_mosaics" / "kampala_buildings.tif"
    with RasterSource(str(shared_data / "spacenet_atlanta" / "full" / "sample_geotiff.tif")) as ref, \
            RasterSource(str(target)) as src, rasterio.open(labels) as lab:
        scale = resolution_scale(src.ground_pixel_size(), ref.ground_pixel_size())
        assert scale == pytest.approx(0.5 / 0.0742, rel=0.01)
        g = TileGrid(src.width, src.height, tile_size=128, overlap=16, scale=scale)
        with ProbabilityStitcher(src.width, src.height, feather=g.feather) as st:
            n = 0
            for tile, rgb, valid in read_tiles(src, g):
                assert rgb.shape == tile.out_shape + (3,)
                pred = lab.read(1, window=tile.window, out_shape=tile.out_shape, resampling=Resampling.average,
                                out_dtype="float32")
                st.add(tile.window, pred, valid)
                n += 1
            assert n == len(g)
            dets = vectorize(st.finalize(), src.transform, src.crs, min_area=16 * scale**2, simplify=scale)
        truth = lab.read(1).astype(bool)
        t, crs = src.transform, src.crs
    feats = to_features(dets, class_name="building", source=str(target), ref_id="sn", model="oracle")
    out = write_layers(str(tmp_path / "kampala.gpkg"), [LayerData(str(target), crs.to_wkt(), feats)])[0]
    ds = ogr.Open(out)
    lyr = ds.GetLayer(0)
    assert lyr.GetName() == "kampala" and lyr.GetFeatureCount() == len(dets) > 10
    from shapely import wkb

    geoms = [wkb.loads(bytes(f.GetGeometryRef().ExportToWkb())) for f in lyr]
    ds = None
    from rasterio.features import rasterize

    back = rasterize([(g_, 1) for g_ in geoms], out_shape=truth.shape, transform=t).astype(bool)
    assert (back & truth).sum() / (back | truth).sum() > 0.8
