"""Reference geometries on real rasters: masks on the right pixels in any CRS, crops, scribbles, clear refusals."""

import json

import numpy as np
import pyproj
import pytest
import rasterio
from rasterio.features import rasterize
from rasterio.windows import Window
from shapely.geometry import LineString, MultiLineString, Point, box, shape
from shapely.ops import transform as shp_transform

from core.errors import InputError
from core.params import ReferenceSpec
from core.raster import RasterSource
from core.reference import build_reference, sample_points_along
from core.vectorize import vectorize

pytestmark = pytest.mark.filterwarnings("ignore::rasterio.errors.NotGeoreferencedWarning")


@pytest.fixture(scope="module")
def zanzibar(shared_data):
    return str(shared_data / "oam_mosaics" / "zanzibar.tif")


@pytest.fixture(scope="module")
def zanzibar_buildings(shared_data):
    """Whole buildings (polygons in EPSG:3857) from the mosaic's label mask around its centre."""
    path = shared_data / "oam_mosaics" / "zanzibar_buildings.tif"
    with rasterio.open(path) as ds:
        win = Window(1600, 1600, 900, 900)
        arr = ds.read(1, window=win)
        t = ds.window_transform(win)
        crs = ds.crs
    frame = box(*rasterio.transform.array_bounds(900, 900, t)).buffer(-1.0)
    dets = vectorize(arr.astype(np.float32), t, crs, min_area=3000, fill_holes=False)
    polys = [d.geometry for d in dets if frame.contains(d.geometry)]
    assert len(polys) >= 3
    return str(path), polys


def _iou(a, b):
    return (a & b).sum() / max(1, (a | b).sum())


def _truth(ref, polys):
    return rasterize([(p, 1) for p in polys], out_shape=ref.mask.shape, transform=ref.transform).astype(bool)


def test_polygons_in_the_raster_crs(zanzibar, zanzibar_buildings):
    _, polys = zanzibar_buildings
    ref = build_reference(ReferenceSpec(zanzibar, tuple(p.wkt for p in polys[:2]), ref_id="z"))
    assert ref.image.shape == (1024, 1024, 3) and ref.mask.shape == (1024, 1024)
    assert ref.downsample == 1.0 and ref.kind == "polygon" and not ref.densified
    w = ref.window
    assert 0 <= w.col_off and w.col_off + w.width <= 4096 and 0 <= w.row_off and w.row_off + w.height <= 4096
    with RasterSource(zanzibar) as src, rasterio.open(zanzibar) as ds:
        assert ref.transform == src.window_transform(w)
        np.testing.assert_array_equal(ref.image, np.moveaxis(ds.read(window=w), 0, -1))
        assert ref.crs == src.crs and ref.res == pytest.approx(src.res)
    assert _iou(ref.mask, _truth(ref, polys[:2])) == 1.0
    # the marked buildings sit inside the crop, with context around them
    rows, cols = np.nonzero(ref.mask)
    assert rows.min() > 32 and cols.min() > 32 and rows.max() < 1024 - 32 and cols.max() < 1024 - 32
    assert ref.pixel_size == pytest.approx((0.0742, 0.0737), abs=5e-4)


def test_polygons_in_another_crs(zanzibar, zanzibar_buildings):
    _, polys = zanzibar_buildings
    base = build_reference(ReferenceSpec(zanzibar, tuple(p.wkt for p in polys[:2])))
    to4326 = pyproj.Transformer.from_crs("EPSG:3857", "EPSG:4326", always_xy=True).transform
    geo = tuple(shp_transform(to4326, p).wkt for p in polys[:2])
    for crs in ("EPSG:4326", pyproj.CRS.from_epsg(4326).to_wkt(), "OGC:CRS84"):
        ref = build_reference(ReferenceSpec(zanzibar, geo, crs=crs))
        # the centring may round one pixel differently after the round trip: compare on the raster's grid
        dc, dr = ref.window.col_off - base.window.col_off, ref.window.row_off - base.window.row_off
        assert abs(dc) <= 1 and abs(dr) <= 1
        a = np.zeros((1026, 1026), bool)
        b = np.zeros((1026, 1026), bool)
        a[1:1025, 1:1025] = base.mask
        b[1 + dr : 1025 + dr, 1 + dc : 1025 + dc] = ref.mask
        assert _iou(a, b) > 0.99


def test_osm_labels_on_an_epsg4326_tile(shared_data):
    name = "area2_OAM-1238449-1046529-21"
    img = str(shared_data / "oam_buildings" / "images" / f"{name}.tif")
    feats = json.load(open(shared_data / "oam_buildings" / "labels_geojson" / f"{name}.geojson"))["features"]
    ref = build_reference(ReferenceSpec(img, tuple(shape(f["geometry"]).wkt for f in feats), crs="OGC:CRS84"))
    with rasterio.open(shared_data / "oam_buildings" / "masks" / f"{name}.tif") as ds:
        truth = ds.read(1).astype(bool)
    assert ref.image.shape == (256, 256, 3) and ref.window == Window(0, 0, 256, 256)  # smaller than a crop
    assert _iou(ref.mask, truth) > 0.95


def test_uint16_reference_and_downsampled_crop(shared_data):
    d = shared_data / "spacenet_atlanta" / "full"
    feats = json.load(open(d / "buildings.geojson"))["features"]
    polys = [shape(f["geometry"]) for f in feats]
    ref = build_reference(ReferenceSpec(str(d / "sample_geotiff.tif"), tuple(p.wkt for p in polys)))
    assert ref.image.dtype == np.uint8 and (ref.image[..., 0] == ref.image[..., 2]).all()
    with rasterio.open(d / "buildings_mask.tif") as ds:
        truth = ds.read(1).astype(bool)
    assert _iou(ref.mask, truth) > 0.97
    assert ref.pixel_size == pytest.approx((0.5, 0.5), abs=1e-3)
    # the marks do not fit in a 256 px crop: the crop is downsampled and its pixel size grows with it
    small = build_reference(ReferenceSpec(str(d / "sample_geotiff.tif"), tuple(p.wkt for p in polys)),
                            crop_size=256)
    assert max(small.image.shape[:2]) <= 256 and small.downsample > 3
    assert small.pixel_size[0] == pytest.approx(0.5 * 900 / small.image.shape[1], rel=0.01)
    assert small.transform.a == pytest.approx(900 * 0.5 / small.image.shape[1])
    frac = small.mask.mean()
    assert frac == pytest.approx(truth.mean(), rel=0.1)


def test_huge_polygon_on_a_large_mosaic(zanzibar):
    with rasterio.open(zanzibar) as ds:
        t = ds.transform
    x0, y0 = t * (500, 500)
    x1, y1 = t * (3500, 3200)
    ref = build_reference(ReferenceSpec(zanzibar, (box(x0, y1, x1, y0).wkt,)))
    assert ref.downsample == pytest.approx((3000 + 64) / 1024, rel=0.01)
    assert max(ref.image.shape[:2]) <= 1024
    assert ref.pixel_size[0] == pytest.approx(0.0742 * ref.downsample, rel=0.01)
    rows, cols = np.nonzero(ref.mask)
    assert (cols.max() - cols.min() + 1) * ref.downsample == pytest.approx(3000, abs=2 * ref.downsample)


def _scribble_through(poly):
    """A line across a building through its interior (along the longer side of its bounding box)."""
    minx, miny, maxx, maxy = poly.bounds
    c = poly.representative_point()
    if maxx - minx > maxy - miny:
        line = LineString([(minx, c.y), (maxx, c.y)])
    else:
        line = LineString([(c.x, miny), (c.x, maxy)])
    return line.intersection(poly.buffer(-0.3))


def test_scribbles_buffered_without_densify(zanzibar, zanzibar_buildings):
    _, polys = zanzibar_buildings
    line = _scribble_through(polys[0])
    ref = build_reference(ReferenceSpec(zanzibar, (line.wkt,)), line_width=3)
    assert ref.kind == "scribble" and not ref.densified
    length_px = line.length / ref.res[0]
    assert 5 * length_px < ref.mask.sum() < 9 * length_px  # a band ~7 px wide along the line
    truth = _truth(ref, [polys[0].buffer(3 * ref.res[0])])
    assert (ref.mask & ~truth).sum() == 0


def test_scribbles_densified_by_a_real_segmenter(zanzibar, zanzibar_buildings):
    """densify = the connected component of the real label mask under the scribble (an oracle segmenter)."""
    mask_path, polys = zanzibar_buildings
    fg = [_scribble_through(polys[0]), _scribble_through(polys[1])]
    bg_line = LineString([polys[2].centroid.coords[0], (polys[2].centroid.x + 3, polys[2].centroid.y)])
    spec = ReferenceSpec(zanzibar, tuple(g.wkt for g in fg), background=(bg_line.wkt,))
    window = build_reference(spec).window
    with rasterio.open(mask_path) as ds:
        labels_in_crop = ds.read(1, window=window).astype(bool)
    from scipy import ndimage

    lab, _ = ndimage.label(labels_in_crop)
    calls = []

    def densify(image, fg_points, bg_points):
        calls.append((image.shape, fg_points.copy(), bg_points.copy()))
        ids = {lab[int(y), int(x)] for x, y in fg_points} - {0}
        return np.isin(lab, list(ids))

    ref = build_reference(spec, densify=densify)
    assert ref.densified and ref.kind == "scribble" and len(calls) == 2
    for (shape_, pts, bgp), line in zip(calls, fg):
        assert shape_ == (1024, 1024, 3) and 2 <= len(pts) <= 16 and len(bgp) >= 1
        to_crop = ~ref.transform
        crop_line = shp_transform(lambda x, y: to_crop * (x, y), line)
        assert max(crop_line.distance(Point(p)) for p in pts) < 1e-6
    truth = _truth(ref, polys[:2])
    assert _iou(ref.mask, truth) > 0.97
    assert ref.background.any() and not (ref.mask & ref.background).any()


def test_background_polygons_are_removed(zanzibar, zanzibar_buildings):
    _, polys = zanzibar_buildings
    p = polys[0]
    minx, miny, maxx, maxy = p.bounds
    half = box(minx - 1, miny - 1, (minx + maxx) / 2, maxy + 1)
    ref = build_reference(ReferenceSpec(zanzibar, (p.wkt,), background=(half.wkt,)))
    full = _truth(ref, [p])
    assert ref.background.any() and 0 < ref.mask.sum() < full.sum()
    assert not (ref.mask & ref.background).any()


def test_refusals(zanzibar, zanzibar_buildings, tmp_path):
    _, polys = zanzibar_buildings
    ok = polys[0].wkt
    cases = [
        (ReferenceSpec(zanzibar, ()), "no geometry"),
        (ReferenceSpec(zanzibar, ("", "  ")), "no geometry"),
        (ReferenceSpec(zanzibar, (), background=(ok,)), "only background"),
        (ReferenceSpec(zanzibar, ("POLYGON ((0 0, 1 1",)), "not valid WKT"),
        (ReferenceSpec(zanzibar, ("BUILDING (1 2)",)), "not valid WKT"),
        (ReferenceSpec(zanzibar, (ok,), crs="EPSG:999999"), "not a known coordinate"),
        (ReferenceSpec(zanzibar, (box(0, 0, 10, 10).wkt,)), "outside the raster"),
        (ReferenceSpec(zanzibar, ("POLYGON ((10 100, 11 100, 11 101, 10 101, 10 100))",), crs="EPSG:4326"),
         "cannot be transformed"),
        (ReferenceSpec(zanzibar, (ok,), crs='ENGCRS["local",EDATUM["site"],CS[Cartesian,2],'
                                           'AXIS["x",east,LENGTHUNIT["metre",1]],AXIS["y",north,'
                                           'LENGTHUNIT["metre",1]]]'), "cannot be transformed"),
        (ReferenceSpec(zanzibar, (ok,), background=(polys[0].buffer(1).wkt,)), "cover no valid pixel"),
        (ReferenceSpec(str(tmp_path / "missing.tif"), (ok,)), "does not exist"),
    ]
    for spec, msg in cases:
        with pytest.raises(InputError, match=msg):
            build_reference(spec)
    # a plain image (no CRS) with geometries in a CRS
    plain = tmp_path / "plain.png"
    with rasterio.open(zanzibar) as ds:
        arr = ds.read(window=Window(0, 0, 64, 64))
    with rasterio.open(plain, "w", driver="PNG", width=64, height=64, count=3, dtype="uint8") as dst:
        dst.write(arr)
    with pytest.raises(InputError, match="has no CRS"):
        build_reference(ReferenceSpec(str(plain), ("POINT (10 10)",), crs="EPSG:3857"))
    # ... but pixel coordinates with an empty CRS are fine (x = column, y = row); a click is a scribble
    ref = build_reference(ReferenceSpec(str(plain), ("POINT (10.5 20.5)", "POLYGON ((30 30, 40 30, 40 40, 30 40, 30 30))")))
    assert ref.mask[20, 10] and ref.mask[35, 35] and not ref.mask[5, 50] and ref.kind == "mixed"


def test_sample_points_along():
    a = LineString([(0, 0), (100, 0)])
    b = LineString([(0, 10), (0, 20)])
    pts = sample_points_along([a, b], 11)
    assert pts.shape == (11, 2)
    on_a = pts[:, 1] == 0
    assert on_a.sum() == 10 and (~on_a).sum() == 1
    np.testing.assert_allclose(np.sort(pts[on_a, 0]), np.arange(5, 100, 10))
    assert tuple(pts[~on_a][0]) == (0, 15)
    # every line gets one point when n >= number of lines; n < number of lines: the longest lines
    assert len(sample_points_along(MultiLineString([a, b]), 2)) == 2
    one = sample_points_along([b, a], 1)
    assert one.shape == (1, 2) and one[0, 1] == 0
    assert sample_points_along([], 5).shape == (0, 2) and sample_points_along(a, 0).shape == (0, 2)
    assert tuple(sample_points_along(Point(3, 4), 2)[1]) == (3, 4)
    ring = box(0, 0, 10, 10)  # a polygon's outline
    pts = sample_points_along(ring, 8)
    assert all(abs(ring.exterior.distance(Point(p))) < 1e-9 for p in pts)
