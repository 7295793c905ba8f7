"""GeoPackage / Shapefile output read back with OGR; no silent overwrite; nothing left behind on failure."""

import os

import numpy as np
import pytest
import rasterio
from osgeo import ogr, osr

from core.errors import CancelledError, InputError
from core.results import FIELDS, Feature, TargetResult
from core.vectorize import to_features, vectorize
from core.writers import LayerData, layer_name, output_paths, write_layers, write_results


def _features(path, class_name="building"):
    with rasterio.open(path) as ds:
        arr, t, crs = ds.read(1).astype(np.float32), ds.transform, ds.crs
    dets = vectorize(arr, t, crs, min_area=16, simplify=1.0)
    return to_features(dets, class_name=class_name, source=str(path), ref_id="ref1", model="embedded"), crs


@pytest.fixture(scope="module")
def layers(shared_data):
    a_feats, a_crs = _features(shared_data / "spacenet_atlanta" / "full" / "buildings_mask.tif")
    b_path = sorted((shared_data / "oam_buildings" / "masks").glob("area5_*.tif"))[0]
    b_feats, b_crs = _features(b_path, class_name="bâtiment")
    return [
        LayerData("/data/atlanta/sample geotiff (pan).tif", a_crs.to_wkt(), a_feats),
        LayerData(str(b_path), b_crs.to_wkt(), b_feats),
    ]


def _read_back(path, name=None):
    ds = ogr.Open(path)
    lyr = ds.GetLayerByName(name) if name else ds.GetLayer(0)
    srs = lyr.GetSpatialRef()
    rows = []
    for f in lyr:
        g = f.GetGeometryRef()
        rows.append(({k: f.GetField(k) for k, _ in FIELDS}, g.GetArea(), g.GetGeometryName()))
    return rows, srs, lyr.GetName(), ds


def _same_crs(srs, wkt):
    other = osr.SpatialReference()
    other.ImportFromWkt(wkt)
    return bool(srs.IsSame(other, ["IGNORE_DATA_AXIS_TO_SRS_AXIS_MAPPING=YES"])) and (
        srs.GetAuthorityCode(None) == other.GetAuthorityCode(None)
    )


def test_geopackage_one_layer_per_raster(tmp_path, layers):
    out = write_layers(str(tmp_path / "found.gpkg"), layers)
    assert out == [str(tmp_path / "found.gpkg")]
    ds = ogr.Open(out[0])
    assert sorted(ds.GetLayer(i).GetName() for i in range(ds.GetLayerCount())) == sorted(
        ["sample_geotiff_pan", layer_name(layers[1].name)]
    )
    ds = None
    for ly, name in zip(layers, ["sample_geotiff_pan", layer_name(layers[1].name)]):
        rows, srs, _, ds = _read_back(out[0], name)
        assert len(rows) == len(ly.features) > 0
        assert _same_crs(srs, ly.crs_wkt)
        for (attrs, area, gname), feat in zip(rows, ly.features):
            assert gname == "POLYGON"
            assert area == pytest.approx(feat.geometry.area, rel=1e-9)
            assert attrs["class_name"] == feat.attributes["class_name"]
            assert attrs["score"] == pytest.approx(feat.attributes["score"])
            assert attrs["area_unit"] == "m2" and attrs["ref_id"] == "ref1" and attrs["model"] == "embedded"
        ds = None
    assert sorted(os.listdir(tmp_path)) == ["found.gpkg"]


def test_shapefile_single_and_per_raster(tmp_path, layers):
    out = write_layers(str(tmp_path / "one.shp"), layers[1:])
    assert out == [str(tmp_path / "one.shp")]
    rows, srs, _, ds = _read_back(out[0])
    assert len(rows) == len(layers[1].features) and rows[0][0]["class_name"] == "bâtiment"
    assert _same_crs(srs, layers[1].crs_wkt)
    ds = None
    assert {p.suffix for p in tmp_path.iterdir()} == {".shp", ".shx", ".dbf", ".prj", ".cpg"}
    # several rasters: one shapefile each (each in its own CRS), named <stem>_<layer>
    out = write_layers(str(tmp_path / "many"), layers, fmt="shp")
    assert out == output_paths(str(tmp_path / "many.shp"), [ly.name for ly in layers])
    assert [os.path.basename(p) for p in out] == ["many_sample_geotiff_pan.shp",
                                                 f"many_{layer_name(layers[1].name)}.shp"]
    for p, ly in zip(out, layers):
        rows, srs, _, ds = _read_back(p)
        assert len(rows) == len(ly.features) and _same_crs(srs, ly.crs_wkt)
        ds = None
    assert not [p for p in os.listdir(tmp_path) if ".tmp-" in p]


def test_existing_output_is_never_overwritten_silently(tmp_path, layers):
    path = str(tmp_path / "out.gpkg")
    write_layers(path, layers[:1])
    before = os.path.getmtime(path), os.path.getsize(path)
    with pytest.raises(InputError, match="already exists"):
        write_layers(path, layers[1:])
    assert (os.path.getmtime(path), os.path.getsize(path)) == before
    write_layers(path, layers[1:], overwrite=True)
    rows, _, name, ds = _read_back(path)
    assert name == layer_name(layers[1].name) and ds.GetLayerCount() == 1
    ds = None
    shp = str(tmp_path / "out.shp")
    write_layers(shp, layers[:1])
    with pytest.raises(InputError, match="already exists"):
        write_layers(shp, layers[:1])
    write_layers(shp, layers[1:], overwrite=True)
    assert len(_read_back(shp)[0]) == len(layers[1].features)


def _failing(features, after):
    for i, f in enumerate(features):
        if i == after:
            raise ValueError("disk on fire")
        yield f


@pytest.mark.parametrize("fmt", ["gpkg", "shp"])
def test_failure_midway_leaves_nothing_behind(tmp_path, layers, fmt):
    feats = layers[0].features
    bad = [layers[1], LayerData("second", layers[0].crs_wkt, _failing(feats, len(feats) // 2))]
    with pytest.raises(ValueError, match="disk on fire"):
        write_layers(str(tmp_path / f"out.{fmt}"), bad)
    assert os.listdir(tmp_path) == []
    # an existing output survives a failed overwrite untouched
    path = write_layers(str(tmp_path / f"keep.{fmt}"), layers[1:])[0]
    size = os.path.getsize(path)
    bad = [LayerData("x", layers[0].crs_wkt, _failing(feats, 3))]
    with pytest.raises(ValueError):
        write_layers(path, bad, overwrite=True)
    assert os.path.getsize(path) == size and len(_read_back(path)[0]) == len(layers[1].features)
    assert not [p for p in os.listdir(tmp_path) if ".tmp-" in p]


def test_cancel_while_writing(tmp_path, layers):
    calls = []

    def cancelled():
        calls.append(1)
        return len(calls) > 1

    with pytest.raises(CancelledError):
        write_layers(str(tmp_path / "c.gpkg"), layers, is_cancelled=cancelled)
    assert os.listdir(tmp_path) == []


def test_bad_destinations(tmp_path, layers):
    with pytest.raises(InputError, match="does not exist"):
        write_layers(str(tmp_path / "missing" / "out.gpkg"), layers)
    with pytest.raises(InputError, match="Cannot write|not writable"):
        write_layers("/proc/virefsam_out.gpkg", layers)
    with pytest.raises(InputError, match="must end in"):
        write_layers(str(tmp_path / "out.geojson"), layers)
    with pytest.raises(InputError, match="does not match"):
        write_layers(str(tmp_path / "out.gpkg"), layers, fmt="shp")
    with pytest.raises(InputError, match="Unknown output format"):
        write_layers(str(tmp_path / "out"), layers, fmt="kml")
    with pytest.raises(InputError, match="nothing to write"):
        write_layers(str(tmp_path / "out.gpkg"), [])
    assert os.listdir(tmp_path) == []


def test_write_results_and_layer_names(tmp_path, layers):
    assert layer_name("/x/my raster-2021.06 (ortho).tif") == "my_raster_2021_06_ortho"
    assert layer_name("///") == "layer"
    results = [TargetResult(raster="/a/scene.tif", crs_wkt=layers[0].crs_wkt, features=list(layers[0].features)),
               TargetResult(raster="/b/scene.tif", crs_wkt=layers[1].crs_wkt, features=[], skipped="all nodata")]
    out = write_results(str(tmp_path / "r.gpkg"), results)
    ds = ogr.Open(out[0])
    assert [ds.GetLayer(i).GetName() for i in range(2)] == ["scene", "scene_2"]
    assert ds.GetLayer(1).GetFeatureCount() == 0
    ds = None
    mp = Feature(geometry=layers[0].features[0].geometry.union(layers[0].features[1].geometry),
                 attributes=dict(layers[0].features[0].attributes))
    out = write_layers(str(tmp_path / "mp.gpkg"), [LayerData("mp", layers[0].crs_wkt, [mp])])
    assert len(_read_back(out[0])[0]) == len(getattr(mp.geometry, "geoms", [mp.geometry]))


@pytest.mark.parametrize(
    "rel,epsg",
    [("oam_mosaics/kampala_buildings.tif", 3857), ("oam_buildings/masks/area4_OAM-1772465-966380-21.tif", 4326),
     ("spacenet_atlanta/tiles/masks/sn_tile_r1_c1.tif", 32616), ("swiss_trees/masks/1091-322_05.tif", 2056)],
)
@pytest.mark.parametrize("fmt", ["gpkg", "shp"])
def test_crs_and_positions_kept(tmp_path, shared_data, rel, epsg, fmt):
    path = shared_data / rel
    with rasterio.open(path) as ds:
        win = rasterio.windows.Window(0, 0, min(512, ds.width), min(512, ds.height))
        arr, t, crs = ds.read(1, window=win).astype(np.float32), ds.window_transform(win), ds.crs
    feats = to_features(vectorize(arr, t, crs, fill_holes=False), class_name="c", source=str(path), ref_id="r",
                        model="m")
    assert feats
    out = write_layers(str(tmp_path / f"o.{fmt}"), [LayerData(str(path), crs.to_wkt(), feats)])[0]
    ds = ogr.Open(out)
    lyr = ds.GetLayer(0)
    srs = lyr.GetSpatialRef()
    srs.AutoIdentifyEPSG()
    assert int(srs.GetAuthorityCode(None)) == epsg
    xmin, xmax, ymin, ymax = lyr.GetExtent()
    left, bottom, right, top = rasterio.transform.array_bounds(arr.shape[0], arr.shape[1], t)
    eps = 1e-9 * max(abs(left), abs(top), 1)
    assert left - eps <= xmin and xmax <= right + eps and bottom - eps <= ymin and ymax <= top + eps
    total = sum(f.GetGeometryRef().GetArea() for f in lyr)
    assert total == pytest.approx(arr.sum() * abs(t.a * t.e), rel=1e-6)


# -- two runs writing the same output at once ---------------------------------------------------------------------
def _meeting(features, barrier):
    """The features, after both writers have passed their "exists already" check and started their temp files."""
    for i, f in enumerate(features):
        if i == 1:
            barrier.wait(timeout=60)
        yield f


def _race(path, runs, overwrite):
    """``write_layers(path, ...)`` for each of ``runs`` in its own thread, both writing at the same moment."""
    import threading

    barrier = threading.Barrier(len(runs))
    out, errors = {}, {}

    def work(key, layer):
        try:
            lay = LayerData(layer.name, layer.crs_wkt, _meeting(layer.features, barrier))
            out[key] = write_layers(path, [lay], overwrite=overwrite)
        except BaseException as exc:  # noqa: BLE001 - checked by the test
            errors[key] = exc

    threads = [threading.Thread(target=work, args=(k, ly)) for k, ly in runs.items()]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    return out, errors


def _class_names_and_count(path):
    ds = ogr.Open(path)
    lyr = ds.GetLayer(0)
    names = {f.GetField("class_name") for f in lyr}
    n = lyr.GetFeatureCount()
    ds = None
    return names, n


@pytest.mark.parametrize("fmt", ["gpkg", "shp"])
def test_two_runs_writing_the_same_output_without_overwrite(tmp_path, layers, fmt):
    """Both runs pass the "exists already" check and write at once: the first to finish keeps its complete file,
    the second refuses with one sentence and leaves the first's file alone; no temporary file is left."""
    path = str(tmp_path / f"same.{fmt}")
    runs = {"atlanta": layers[0], "oam": layers[1]}
    for _ in range(3):  # the order of finishing varies: every round must end the same way
        out, errors = _race(path, runs, overwrite=False)
        assert len(out) == 1 and len(errors) == 1, (out, errors)
        (winner,), (loser, exc) = out, next(iter(errors.items()))
        assert isinstance(exc, InputError) and "another run" in str(exc) and "not kept" in str(exc)
        names, n = _class_names_and_count(path)
        assert names == {runs[winner].features[0].attributes["class_name"]}
        assert n == len(runs[winner].features)
        assert not [p for p in os.listdir(tmp_path) if ".tmp-" in p or p.endswith(".lock")]
        for p in os.listdir(tmp_path):
            os.remove(tmp_path / p)


@pytest.mark.parametrize("fmt", ["gpkg", "shp"])
def test_two_runs_writing_the_same_output_with_overwrite(tmp_path, layers, fmt):
    """With overwrite both succeed and the later rename wins: the output is one run's complete file (for a
    shapefile: geometries and attributes of the same run), never a mix, and no temporary file is left."""
    path = str(tmp_path / f"same.{fmt}")
    write_layers(path, layers[:1])  # an earlier output both replace
    runs = {"atlanta": layers[0], "oam": layers[1]}
    for _ in range(3):
        out, errors = _race(path, runs, overwrite=True)
        assert not errors and set(out) == set(runs)
        names, n = _class_names_and_count(path)
        (cls,) = names
        winner = next(k for k, ly in runs.items() if ly.features[0].attributes["class_name"] == cls)
        assert n == len(runs[winner].features)
        rows, _, _, ds = _read_back(path)
        areas = sorted(a for _, a, _ in rows)
        ds = None
        assert areas == pytest.approx(sorted(f.geometry.area for f in runs[winner].features), rel=1e-9)
        assert not [p for p in os.listdir(tmp_path) if ".tmp-" in p or p.endswith(".lock")]


def test_temporary_names_are_unique_per_process_and_call(tmp_path):
    from core.writers import _tmp_name

    final = str(tmp_path / "out.gpkg")
    names = {_tmp_name(final) for _ in range(100)}
    assert len(names) == 100
    for n in names:
        assert os.path.dirname(n) == str(tmp_path) and f".tmp-{os.getpid()}-" in os.path.basename(n)
