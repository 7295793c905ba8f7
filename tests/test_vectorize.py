"""Vectorisation against real labels: polygons at the right place in EPSG:4326 / 3857 / 32616 / 2056, areas in m2."""

import json

import numpy as np
import pyproj
import pytest
import rasterio
from rasterio import Affine
from rasterio.features import rasterize
from rasterio.windows import Window
from shapely.geometry import Polygon, box, shape
from shapely.ops import unary_union

import core.vectorize as vz
from core.errors import CancelledError
from core.vectorize import AreaCalculator, to_features, vectorize

pytestmark = pytest.mark.filterwarnings("ignore::rasterio.errors.NotGeoreferencedWarning")


def _read(path, window=None):
    with rasterio.open(path) as ds:
        return ds.read(1, window=window), (ds.window_transform(window) if window else ds.transform), ds.crs


def _union(dets):
    return unary_union([d.geometry for d in dets])


def test_oam_buildings_masks_match_their_osm_polygons(shared_data):
    """All 48 EPSG:4326 tiles: the vectorised fAIr masks coincide with the OSM footprints they were made from."""
    masks = sorted((shared_data / "oam_buildings" / "masks").glob("*.tif"))
    assert len(masks) == 48
    ious = []
    for m in masks:
        arr, t, crs = _read(m)
        assert crs.to_epsg() == 4326
        dets = vectorize(arr.astype(np.float32), t, crs)
        gj = shared_data / "oam_buildings" / "labels_geojson" / (m.stem + ".geojson")
        tile = box(*rasterio.transform.array_bounds(arr.shape[0], arr.shape[1], t))
        osm = unary_union([shape(f["geometry"]) for f in json.load(open(gj))["features"]]).intersection(tile)
        got = _union(dets)
        ious.append(got.intersection(osm).area / got.union(osm).area)
        assert tile.buffer(1e-12).contains(got)
        assert all(d.area_unit == "m2" for d in dets)
    assert min(ious) > 0.95 and np.mean(ious) > 0.98, (min(ious), np.mean(ious))


def test_geodesic_area_in_epsg4326(shared_data):
    m = sorted((shared_data / "oam_buildings" / "masks").glob("area2_*.tif"))[0]
    arr, t, crs = _read(m)
    dets = vectorize(arr.astype(np.float32), t, crs)
    # every pixel's ground area at this latitude
    geod = pyproj.Geod(ellps="WGS84")
    cx, cy = t * (arr.shape[1] / 2, arr.shape[0] / 2)
    px = abs(geod.polygon_area_perimeter([cx, cx + t.a, cx + t.a, cx], [cy, cy, cy + t.e, cy + t.e])[0])
    total = sum(d.area for d in dets)
    assert total == pytest.approx(arr.sum() * px, rel=0.002)
    assert sum(d.pixels for d in dets) == arr.sum()


def test_spacenet_uint16_scene_epsg32616(shared_data):
    d = shared_data / "spacenet_atlanta" / "full"
    arr, t, crs = _read(d / "buildings_mask.tif")
    dets = vectorize(arr.astype(np.float32), t, crs)
    assert crs.to_epsg() == 32616
    labels = unary_union([shape(f["geometry"]) for f in json.load(open(d / "buildings.geojson"))["features"]])
    labels = labels.intersection(box(*rasterio.transform.array_bounds(900, 900, t)))
    got = _union(dets)
    assert got.intersection(labels).area / got.union(labels).area > 0.95
    # planar area in a metre CRS: 0.25 m2 per pixel, exactly
    assert all(x.area_unit == "m2" for x in dets)
    assert sum(x.area for x in dets) == pytest.approx(arr.sum() * 0.25)
    # every labelled building (>= 20 m2) is found by one polygon that contains its centroid
    for f in json.load(open(d / "buildings.geojson"))["features"]:
        g = shape(f["geometry"])
        if g.area >= 20 and g.within(box(*rasterio.transform.array_bounds(900, 900, t))):
            assert sum(x.geometry.buffer(0.5).contains(g.representative_point()) for x in dets) >= 1


def test_web_mercator_area_is_geodesic(shared_data):
    arr, t, crs = _read(shared_data / "oam_mosaics" / "zanzibar_buildings.tif", Window(1024, 1024, 1024, 1024))
    dets = vectorize(arr.astype(np.float32), t, crs, min_area=50)
    assert dets and all(d.area_unit == "m2" for d in dets)
    bounds = box(*rasterio.transform.array_bounds(1024, 1024, t))
    for d in dets:
        assert bounds.covers(d.geometry)
        # Web Mercator planar area overstates the ground area by ~1/cos^2(6.07 deg)
        ratio = d.area / d.geometry.area
        assert ratio == pytest.approx(np.cos(np.radians(6.07)) ** 2, rel=0.01)


def test_swiss_lv95_crs_kept(shared_data):
    arr, t, crs = _read(shared_data / "swiss_trees" / "masks" / "1091-322_00.tif")
    dets = vectorize(arr.astype(np.float32), t, crs, fill_holes=False)
    assert crs.to_epsg() == 2056
    b = box(*rasterio.transform.array_bounds(arr.shape[0], arr.shape[1], t))
    assert all(b.covers(d.geometry) for d in dets)
    assert sum(d.area for d in dets) == pytest.approx(arr.sum() * 0.25)
    # back to raster: identical to the mask
    back = rasterize([(d.geometry, 1) for d in dets], out_shape=arr.shape, transform=t, dtype="uint8")
    np.testing.assert_array_equal(back, arr)


def _ring_map():
    p = np.zeros((60, 80), np.float32)
    p[10:40, 10:40] = 0.9  # a square with a hole ...
    p[18:32, 18:32] = 0.1
    p[23:27, 23:27] = 0.7  # ... and a small island inside the hole
    p[45:47, 60:62] = 0.95  # a 4-pixel speck
    p[5:15, 50:75] = 0.6
    return p


def test_holes_min_area_and_scores():
    p = _ring_map()
    t = Affine(2.0, 0, 500.0, 0, -2.0, 900.0)
    dets = vectorize(p, t, "EPSG:32616", fill_holes=True)
    assert len(dets) == 3  # island merged into the filled square, speck kept (min_area 0)
    sq = max(dets, key=lambda d: d.pixels)
    assert sq.pixels == 900 and len(sq.geometry.interiors) == 0
    expect = (900 * 0.9 - 196 * 0.9 + 180 * 0.1 + 16 * 0.7) / 900  # mean over the filled square
    assert sq.score == pytest.approx(expect, abs=1e-5)
    assert sq.area == pytest.approx(900 * 4.0) and sq.area_unit == "m2"
    # holes kept, min area drops the speck and the island
    dets = vectorize(p, t, "EPSG:32616", fill_holes=False, min_area=20)
    assert len(dets) == 2
    sq = max(dets, key=lambda d: d.pixels)
    assert len(sq.geometry.interiors) == 1 and sq.pixels == 900 - 196
    assert sq.score == pytest.approx(0.9, abs=1e-6)
    # holes smaller than min_area are filled even with fill_holes=False
    dets = vectorize(p, t, None, fill_holes=False, min_area=200)
    assert len(dets) == 2  # the square (hole of 196 px filled) and the 250 px block
    sq = max(dets, key=lambda d: d.pixels)
    assert len(sq.geometry.interiors) == 0 and sq.area_unit == "px2" and sq.area == 900
    # threshold
    high = vectorize(p, t, None, threshold=0.65)  # the 0.6 block goes
    assert sorted(d.pixels for d in high) == [4, 900]
    assert vectorize(np.zeros((30, 30), np.float32), t) == []


def test_polygons_are_on_the_pixel_corner_grid():
    p = np.zeros((20, 30), np.float32)
    p[3:5, 7:10] = 1
    t = Affine(0.5, 0, 100.0, 0, -0.25, 50.0)
    (d,) = vectorize(p, t, None)
    assert d.geometry.bounds == pytest.approx((100 + 7 * 0.5, 50 - 5 * 0.25, 100 + 10 * 0.5, 50 - 3 * 0.25))
    assert d.geometry.exterior.is_ccw


def test_simplify_keeps_shape(shared_data):
    arr, t, crs = _read(shared_data / "oam_mosaics" / "kampala_buildings.tif", Window(0, 0, 1024, 1024))
    raw = vectorize(arr.astype(np.float32), t, crs, min_area=100)
    simp = vectorize(arr.astype(np.float32), t, crs, min_area=100, simplify=1.5)
    assert len(raw) == len(simp)
    nv_raw = sum(len(d.geometry.exterior.coords) for d in raw)
    nv_simp = sum(len(d.geometry.exterior.coords) for d in simp)
    assert nv_simp < 0.6 * nv_raw
    px = abs(t.a)
    for a, b in zip(raw, simp):
        assert b.geometry.is_valid
        # each removed vertex moves the outline by at most the tolerance: area change <= perimeter * tol
        assert abs(a.geometry.area - b.geometry.area) <= a.geometry.length * 1.5 * px
        assert a.score == b.score and a.pixels == b.pixels


def test_large_map_path_equals_in_memory_path(shared_data, monkeypatch, tmp_path):
    arr, t, crs = _read(shared_data / "oam_mosaics" / "kampala_buildings.tif")
    mm = np.memmap(tmp_path / "p.f32", dtype=np.float32, mode="w+", shape=arr.shape)
    mm[:] = arr
    a = vectorize(mm, t, crs, min_area=16)
    monkeypatch.setattr(vz, "IN_MEMORY_MAX_PIXELS", 0)  # force the temporary-GeoTIFF, scanline path
    monkeypatch.setattr(vz, "SCORE_BLOCK_PIXELS", 50_000)  # and block-wise score reads
    b = vectorize(mm, t, crs, min_area=16, tmp_dir=str(tmp_path))
    assert len(a) == len(b) > 50
    key = lambda d: d.geometry.bounds  # noqa: E731
    for x, y in zip(sorted(a, key=key), sorted(b, key=key)):
        assert x.geometry.equals(y.geometry) and x.score == pytest.approx(y.score) and x.area == y.area
    assert sorted(p.name for p in tmp_path.iterdir()) == ["p.f32"]  # the temporary mask is gone


def test_cancel_and_features():
    p = _ring_map()
    with pytest.raises(CancelledError):
        vectorize(p, Affine.identity(), None, is_cancelled=lambda: True)
    feats = to_features(vectorize(p, Affine.identity(), None), class_name="roof", source="x.tif", ref_id="r",
                        model="embedded")
    assert feats and set(feats[0].attributes) == {"class_name", "score", "area", "area_unit", "source",
                                                  "ref_id", "model"}
    assert isinstance(feats[0].geometry, Polygon)


def test_area_calculator_units():
    sq = box(0, 0, 100, 100)
    assert AreaCalculator("EPSG:32616").unit == "m2" and AreaCalculator("EPSG:32616")(sq) == 10000
    ft = AreaCalculator("EPSG:2263")  # NAD83 / New York Long Island (US survey feet)
    assert ft.unit == "m2" and ft(sq) == pytest.approx(10000 * 0.3048006096**2)
    assert AreaCalculator(None)(sq, 7) == 7
    # geodesic areas subtract holes
    geo = AreaCalculator("EPSG:4326")
    outer, inner = box(36.0, -1.3, 36.001, -1.299), box(36.0002, -1.2998, 36.0006, -1.2994)
    holed = Polygon(outer.exterior.coords, [inner.exterior.coords])
    assert geo.unit == "m2" and geo(holed) == pytest.approx(geo(outer) - geo(inner), rel=1e-9)
    assert geo(outer) == pytest.approx(111_320 * 111_320 * 1e-6 * np.cos(np.radians(1.3)), rel=0.01)
    eng = AreaCalculator('ENGCRS["local",EDATUM["x"],CS[Cartesian,2],AXIS["x",east,LENGTHUNIT["unknown",1]],'
                         'AXIS["y",north,LENGTHUNIT["unknown",1]]]')
    assert eng.unit in ("map_units2", "m2")
