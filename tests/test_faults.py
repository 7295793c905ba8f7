"""Bad input and faults (issue #9): every case ends in one sentence that says what to do, or in correct output.

Cases already tested elsewhere are listed in docs/FAULTS.md with the test that covers them; this file adds the
rest. The CLI cases run ``python -m core segment`` in subprocesses (exit code 2, one line on stderr, no
traceback); the engine cases call ``core.pipeline.run`` with the real embedded SAM on real imagery cut from
``oam_buildings`` (256 px tiles, tile_size 256). The only injected failure is CUDA's out-of-memory error, which
cannot happen on this machine (no GPU): it is raised from the predict path to exercise the CPU fallback.

Cost: the encoder (~3-12 s per tile on this CPU) dominates, so the runs are built to need few encoder passes:
most targets are the reference raster itself (or have its pixels), whose tile the predictor has already encoded
with the reference crop.
"""

import json
import os
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

import numpy as np
import pytest
import rasterio
from osgeo import gdal, ogr
from rasterio import features
from shapely import affinity, wkb
from shapely.geometry import LineString, box, mapping, shape

from core.errors import CancelledError, InputError, ModelError
from core.params import ModelParams, ReferenceSpec, RunParams
from core.pipeline import CPU_FALLBACK_NOTE, run
from core.raster import PIXEL_FRAME, RasterSource

ROOT = Path(__file__).resolve().parent.parent
TILE_A = "area1_OAM-1277174-1083983-21"  # Zanzibar, EPSG:4326, 256 x 256, buildings: 50 % of the pixels
TILE_B = "area1_OAM-1277175-1083850-21"  # buildings: 41 %

pytestmark = pytest.mark.filterwarnings("ignore::rasterio.errors.NotGeoreferencedWarning")


# -- helpers ------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def oam(shared_data):
    return shared_data / "oam_buildings"


def _image(oam, name):
    return oam / "images" / f"{name}.tif"


def _largest_building(oam, name):
    """The largest OSM footprint of a tile (CRS84 WKT): its bounding box plus the crop margin fits in 256 px."""
    fc = json.loads((oam / "labels_geojson" / f"{name}.geojson").read_text())
    return max((shape(f["geometry"]) for f in fc["features"]), key=lambda g: g.area)


def _params(ref, fg, targets, out=None, crs="OGC:CRS84", tile_size=256, overlap=32, **kw):
    return RunParams(
        class_name=kw.pop("class_name", "building"),
        references=(ReferenceSpec(raster=str(ref), foreground=tuple(g.wkt for g in fg), crs=crs),),
        targets=tuple(str(t) for t in targets),
        output=None if out is None else str(out),
        model=kw.pop("model", ModelParams(device="cpu")),
        mode=kw.pop("mode", "training_free"),
        tile_size=tile_size,
        overlap=overlap,
        **kw,
    )


def _write(path, data, like, **kw):
    """A GeoTIFF with the georeferencing of ``like`` (a rasterio profile), bands/dtype from ``data``."""
    profile = dict(driver="GTiff", width=data.shape[2], height=data.shape[1], count=data.shape[0],
                   dtype=data.dtype.name, crs=like["crs"], transform=like["transform"])
    profile.update(kw)
    with rasterio.open(path, "w", **profile) as dst:
        dst.write(data)
    return Path(path)


def _read(path):
    with rasterio.open(path) as ds:
        return ds.read(), ds.profile


def _iou(geoms, mask_path, transform=None):
    with rasterio.open(mask_path) as ds:
        gt = ds.read(1) > 0
        t = ds.transform if transform is None else transform
    pred = features.rasterize(geoms, out_shape=gt.shape, transform=t) > 0 if geoms else np.zeros_like(gt)
    return (pred & gt).sum() / max(1, (pred | gt).sum())


def _layers(path):
    ds = ogr.Open(str(path))
    out = {}
    for i in range(ds.GetLayerCount()):
        lyr = ds.GetLayer(i)
        out[lyr.GetName()] = ([wkb.loads(bytes(f.GetGeometryRef().ExportToWkb())) for f in lyr], lyr.GetSpatialRef())
    return out


def _virefsam_temp_files(folder):
    return sorted(n for n in os.listdir(folder) if n.startswith("virefsam_"))


@pytest.fixture(scope="module")
def baseline_a(oam, tmp_path_factory):
    """A plain run: tile A's largest building as reference, tile A as target (one encoder pass)."""
    out = tmp_path_factory.mktemp("baseline") / "a.gpkg"
    result = run(_params(_image(oam, TILE_A), [_largest_building(oam, TILE_A)], [_image(oam, TILE_A)], out))
    return result


# -- CLI: one sentence on stderr, exit code 2 ---------------------------------------------------------------------
def _cli_many(cases, timeout=600):
    """Run ``python -m core segment ARGS`` for every case at once; {name: CompletedProcess-like (rc, out, err)}."""
    procs = {}
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    for name, args in cases.items():
        cmd = [sys.executable, "-m", "core", "segment", *map(str, args), "--quiet", "--device", "cpu"]
        procs[name] = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                       env=env)
    out = {}
    for name, p in procs.items():
        stdout, stderr = p.communicate(timeout=timeout)
        out[name] = (p.returncode, stdout, stderr)
    return out


def test_cli_refuses_bad_input_with_one_sentence(oam, tmp_path):
    d = tmp_path
    a_img = _image(oam, TILE_A)
    data, prof = _read(a_img)
    building = _largest_building(oam, TILE_A)

    def geojson(path, feats):
        path.write_text(json.dumps({"type": "FeatureCollection", "features": [
            {"type": "Feature", "properties": props, "geometry": mapping(g)} for g, props in feats]}))
        return path

    ref_ok = geojson(d / "ref.geojson", [(building, {})])
    empty = geojson(d / "empty.geojson", [])
    only_bg = geojson(d / "only_bg.geojson", [(LineString(building.exterior.coords), {"role": "background"})])
    outside = geojson(d / "outside.geojson", [(affinity.translate(building, 1.0, 1.0), {})])  # 1 degree away
    truncated = d / "truncated.tif"
    truncated.write_bytes(a_img.read_bytes()[: a_img.stat().st_size // 3])
    rot = prof["transform"]
    rotated = _write(d / "rotated.tif", data, prof,
                     transform=rasterio.Affine(rot.a, rot.a * 0.2, rot.c, rot.a * 0.2, rot.e, rot.f))
    from core.modeling.setup_model import weights_path

    weights = weights_path()
    assert weights.is_file()
    half = d / "mobile_sam_half.pt"
    half.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    text = d / "notes.pth"
    text.write_text("these are my notes, not a checkpoint\n")

    base = ["--reference", a_img, "--reference-geometry", ref_ok, "--targets", a_img, "--adapters", "none"]

    def with_(**kw):
        args = list(base)
        for k, v in kw.items():
            flag = "--" + k.replace("_", "-")
            if flag in args:
                args[args.index(flag) + 1] = v
            else:
                args += [flag, *(v if isinstance(v, list) else [v])]
        if "--out" not in args:
            args += ["--out", d / "out" / f"{len(args)}.gpkg"]
        return args

    (d / "out").mkdir()
    xyz = "type=xyz&url=https://tile.openstreetmap.org/{z}/{x}/{y}.png&zmax=19&zmin=0"
    cases = {
        "empty reference": (with_(reference_geometry=empty), "has no geometry"),
        "only background": (with_(reference_geometry=only_bg), "only background marks"),
        "outside the raster": (with_(reference_geometry=outside), "lie outside the raster"),
        "corrupted target": (with_(targets=truncated), "corrupted or truncated"),
        "rotated target": (with_(targets=rotated), "rotated or sheared"),
        "web target": (with_(targets=xyz), "web service"),
        "unwritable folder": (with_(out="/proc/virefsam_out.gpkg"), "not writable"),
        "missing folder": (with_(out=d / "nowhere" / "out.gpkg"), "does not exist"),
        "missing adapters": (with_(adapters=d / "missing_adapters.pt"), "does not exist"),
        "missing checkpoint": (with_(model="vit_b", checkpoint=d / "sam_vit_b_01ec64.pth"), "does not exist"),
        "not a checkpoint": (with_(model="vit_b", checkpoint=text), "not a readable PyTorch checkpoint"),
        "truncated checkpoint": (with_(model="vit_t", checkpoint=half), "truncated"),
        "other variant": (with_(model="vit_b", checkpoint=weights), "looks like a MobileSAM (vit_t) checkpoint"),
    }
    results = _cli_many({name: args for name, (args, _) in cases.items()})
    for name, (_, expected) in cases.items():
        rc, stdout, stderr = results[name]
        assert rc == 2, (name, rc, stderr[-2000:])
        assert "Traceback" not in stderr, (name, stderr)
        lines = stderr.strip().splitlines()
        assert len(lines) == 1, (name, stderr)
        assert lines[0].startswith("error: ") and lines[0].endswith("."), (name, lines[0])
        assert expected in lines[0], (name, lines[0])
        assert "Wrote" not in stdout
    assert os.listdir(d / "out") == []  # nothing written, not even a temporary file


# -- rasters: what RasterSource makes of them (cheap, no model) --------------------------------------------------
@pytest.fixture(scope="module")
def odd_rasters(oam, tmp_path_factory):
    """Rasters cut from tile A: bands, types, nodata and georeferencing an analyst meets. name -> path."""
    d = tmp_path_factory.mktemp("odd rasters é")
    data, prof = _read(_image(oam, TILE_A))
    rgb = data.astype(np.int32)
    noise = np.random.default_rng(0).integers(-6, 7, data.shape)
    out = {
        "1 band": _write(d / "gray.tif", data[:1], prof),
        "2 bands": _write(d / "two.tif", data[:2], prof),
        # RGB + NIR-like band (undefined colour interpretation): the first three bands are used
        "4 bands": _write(d / "rgbn.tif", np.concatenate([data, data[:1]]), prof),
        # 8 bands: RGB, then RGB with noise, then two more: again the first three
        "8 bands": _write(d / "eight bands ü.tif",
                          np.concatenate([data, np.clip(rgb + noise, 0, 255).astype(np.uint8), data[:2]]), prof),
        "uint16": _write(d / "u16.tif", (rgb * 40 + 1000).astype(np.uint16), prof),
        "int16 negative": _write(d / "i16.tif", (rgb * 3 - 400).astype(np.int16), prof),
    }
    f = (rgb / 255.0 - 0.3).astype(np.float32)
    f[:, 100:140, 60:200] = np.nan
    out["float32 NaN"] = _write(d / "f32.tif", f, prof)
    nd = data.copy()
    nd[:, :, :64] = 0
    out["nodata areas"] = _write(d / "nodata.tif", nd, prof, nodata=0)
    out["all nodata"] = _write(d / "all_nodata.tif", np.zeros_like(data), prof, nodata=0)
    out["smaller than a tile"] = _write(d / "tiny.tif", (rgb[:, 40:41, 10:15] * 3 - 400).astype(np.int16), prof)
    vrt = d / "eight.vrt"
    gdal.UseExceptions()
    ds = gdal.BuildVRT(str(vrt), [str(out["8 bands"])])
    ds = None  # noqa: F841 - closing writes the VRT
    out["VRT"] = vrt
    for driver, ext in (("PNG", "png"), ("JPEG", "jpg")):
        p = d / f"plain {driver.lower()}.{ext}"
        with rasterio.open(p, "w", driver=driver, width=256, height=256, count=3, dtype="uint8") as dst:
            dst.write(data)
        out[f"{driver} without georeferencing"] = p
    no_crs = dict(prof)
    no_crs.pop("crs")
    out["GeoTIFF without CRS"] = _write(d / "no_crs.tif", data, dict(no_crs, crs=None))
    return out


@pytest.mark.parametrize("case,bands,stretched,valid_fraction", [
    ("1 band", (1,), False, 1.0),
    ("2 bands", (1, 2), False, 1.0),
    ("4 bands", (1, 2, 3), False, 1.0),
    ("8 bands", (1, 2, 3), False, 1.0),
    ("VRT", (1, 2, 3), False, 1.0),
    ("uint16", (1, 2, 3), True, 1.0),
    ("int16 negative", (1, 2, 3), True, 1.0),
    ("float32 NaN", (1, 2, 3), True, 1 - 40 * 140 / 256 ** 2),
    ("nodata areas", (1, 2, 3), False, 0.75),  # (a real pixel 0 in all bands would be nodata too)
    ("all nodata", (1, 2, 3), False, 0.0),
    ("smaller than a tile", (1, 2, 3), True, 1.0),
    ("PNG without georeferencing", (1, 2, 3), False, 1.0),
    ("JPEG without georeferencing", (1, 2, 3), False, 1.0),
    ("GeoTIFF without CRS", (1, 2, 3), False, 1.0),
])
def test_odd_rasters_read_as_8bit_rgb(odd_rasters, oam, case, bands, stretched, valid_fraction):
    with RasterSource(str(odd_rasters[case])) as src:
        assert src.bands == bands
        assert (src.stretch is not None) == stretched
        if stretched:
            assert all(np.isfinite(v) and hi > lo for lo, hi in src.stretch for v in (lo, hi))
        rgb, valid = src.read_rgb8()
        assert rgb.shape == (src.height, src.width, 3) and rgb.dtype == np.uint8
        assert valid.mean() == pytest.approx(valid_fraction, abs=0.002)
        assert (rgb[~valid] == 0).all()
        if valid.any() and valid_fraction == 1.0 and src.width > 16:
            assert rgb.std() > 10  # an image, not a flat stretch
        if case in ("4 bands", "8 bands", "VRT", "PNG without georeferencing"):
            a, _ = _read(_image(oam, TILE_A))
            np.testing.assert_array_equal(rgb, np.moveaxis(a, 0, -1))
        if "without georeferencing" in case:  # QGIS's frame for such rasters: x = column, y = -row
            assert not src.georeferenced and src.crs is None and src.transform == PIXEL_FRAME
            assert tuple(src.bounds) == (0, -256, 256, 0)
        elif case == "GeoTIFF without CRS":  # the geotransform is kept, there is just no CRS
            assert src.georeferenced and src.crs is None and src.transform.a == pytest.approx(6.7055e-07, rel=1e-3)


# -- rasters end to end ---------------------------------------------------------------------------------------------
def test_odd_targets_end_to_end(odd_rasters, oam, tmp_path, baseline_a):
    """8 bands in a path with spaces and non-ASCII letters, a VRT of it, an all-nodata raster and a 5 x 1 int16
    raster with negative values, written to a GeoPackage in a folder with a space and an umlaut."""
    out = tmp_path / "résultats ü" / "buildings 1.gpkg"
    out.parent.mkdir()
    targets = [odd_rasters[k] for k in ("8 bands", "VRT", "all nodata", "smaller than a tile")]
    result = run(_params(_image(oam, TILE_A), [_largest_building(oam, TILE_A)], targets, out))
    eight, vrt, nodata, tiny = result.targets
    assert nodata.skipped and "nodata" in nodata.skipped
    assert eight.skipped is None and vrt.skipped is None and tiny.skipped is None
    # the 8-band file and its VRT show the model tile A's RGB: the polygons of the plain RGB tile
    base = sorted(f.geometry.wkt for f in baseline_a.targets[0].features)
    assert sorted(f.geometry.wkt for f in eight.features) == base
    assert sorted(f.geometry.wkt for f in vrt.features) == base
    with rasterio.open(odd_rasters["smaller than a tile"]) as ds:
        tiny_box = box(*ds.bounds).buffer(1e-9)
    assert all(tiny_box.contains(f.geometry) for f in tiny.features)
    layers = _layers(out)
    assert len(layers) == 4  # one per target, the skipped one empty
    assert sorted(len(g) for g, _ in layers.values()) == sorted(t.n_objects for t in result.targets)
    assert all(srs.GetAuthorityCode(None) == "4326" for _, srs in layers.values())
    assert Path(str(out) + ".params.json").is_file()


def test_raster_without_georeferencing_is_processed_in_qgis_pixel_frame(odd_rasters, oam, tmp_path):
    """A plain PNG: marks in QGIS's pixel frame (x = column, y = -row, no CRS) -> polygons in the same frame,
    written without CRS, areas in pixels. Image coordinates (y = row downwards) are accepted for the marks too."""
    from core.reference import build_reference

    png = odd_rasters["PNG without georeferencing"]
    mask = oam / "masks" / f"{TILE_A}.tif"
    with rasterio.open(_image(oam, TILE_A)) as ds:
        to_px = ~ds.transform
    building = affinity.affine_transform(_largest_building(oam, TILE_A), [to_px.a, to_px.b, to_px.d, to_px.e,
                                                                          to_px.c, to_px.f])  # image coordinates
    qgis_frame = affinity.scale(building, 1, -1, origin=(0, 0))
    a = build_reference(ReferenceSpec(str(png), (qgis_frame.wkt,)), crop_size=256)
    b = build_reference(ReferenceSpec(str(png), (building.wkt,)), crop_size=256)
    np.testing.assert_array_equal(a.mask, b.mask)
    assert 0.9 < a.mask.sum() / building.area < 1.1

    out = tmp_path / "plain.gpkg"
    result = run(_params(png, [qgis_frame], [png], out, crs=""))
    (t,) = result.targets
    assert t.crs_wkt == "" and t.n_objects > 0
    assert {f.attributes["area_unit"] for f in t.features} == {"px2"}
    (geoms, srs), = _layers(out).values()
    assert srs is not None and srs.IsLocal() and "Undefined Cartesian SRS" in srs.ExportToWkt()
    frame = box(0, -256, 256, 0).buffer(1e-9)
    assert all(frame.contains(g) for g in geoms)
    iou = _iou(geoms, mask, transform=PIXEL_FRAME)
    assert iou > 0.3, iou


# -- references -----------------------------------------------------------------------------------------------------
def test_reference_covering_the_whole_crop(oam, tmp_path):
    """Everything marked, no background left to learn from: still a result (it was an IndexError)."""
    data, prof = _read(_image(oam, TILE_A))
    small = _write(tmp_path / "part.tif", data[:, :200, :200], prof)
    with rasterio.open(small) as ds:
        everything = box(*ds.bounds)
    result = run(_params(small, [everything], [small], crs="", tile_size=512, overlap=64))
    (t,) = result.targets
    assert t.skipped is None
    assert all(0 <= f.attributes["score"] <= 1 for f in t.features)


def test_reference_object_smaller_than_a_feature_cell(oam, tmp_path):
    """A 3 x 3 pixel object on a 256 px reference crop: 12 x 12 px in SAM's 1024 input, less than one 16 x 16 cell
    of its 64 x 64 feature grid (at tile size 1024 it would be a fifth of a cell): a result, no error."""
    img = _image(oam, TILE_A)
    with rasterio.open(img) as ds:
        t = ds.transform
    speck = box(*(t * (120, 123)), *(t * (123, 120)))
    result = run(_params(img, [speck], [img], crs=""))
    (tr,) = result.targets
    assert tr.skipped is None
    assert all(f.geometry.is_valid for f in tr.features)


# -- runs -----------------------------------------------------------------------------------------------------------
def test_cancel_in_the_middle_removes_temporary_files(oam, tmp_path, monkeypatch):
    """Cancelled after the first of three tiles: CancelledError, no output, no virefsam_* file left in the
    system temp dir (an isolated one for this test, so other processes' files do not count)."""
    systmp = tmp_path / "systmp"
    systmp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(systmp))
    a, prof = _read(_image(oam, TILE_A))
    b, _ = _read(_image(oam, TILE_B))
    mosaic = _write(tmp_path / "a_b.tif", np.concatenate([a, b], axis=2), prof)  # 512 x 256: 3 tiles
    out = tmp_path / "out" / "cancelled.gpkg"
    out.parent.mkdir()
    seen = {}

    def progress(fraction, message):
        if "tile 1/3" in message:
            seen["temp"] = _virefsam_temp_files(systmp)
            seen["cancel"] = True

    assert _virefsam_temp_files(systmp) == []
    with pytest.raises(CancelledError):
        run(_params(_image(oam, TILE_A), [_largest_building(oam, TILE_A)], [mosaic], out),
            progress=progress, is_cancelled=lambda: seen.get("cancel", False))
    assert any(n.startswith("virefsam_prob_") for n in seen["temp"])  # the probability map was on disk
    assert _virefsam_temp_files(systmp) == []
    assert os.listdir(out.parent) == []


def test_cuda_out_of_memory_falls_back_to_cpu_and_says_so(oam, tmp_path, monkeypatch, baseline_a):
    """INJECTED: there is no GPU here, so torch.cuda.OutOfMemoryError is raised from ReferencePredictor.predict
    once. The run must go on on the CPU, give the same polygons, and say so."""
    import torch

    from core.modeling.predictor import ReferencePredictor

    real_predict = ReferencePredictor.predict
    calls = []

    def predict_oom_once(self, image):
        calls.append(id(self))
        if len(calls) == 1:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (injected by the test)")
        return real_predict(self, image)

    monkeypatch.setattr(ReferencePredictor, "predict", predict_oom_once)
    messages = []
    img = _image(oam, TILE_A)
    result = run(_params(img, [_largest_building(oam, TILE_A)], [img]), progress=lambda f, m: messages.append(m))
    assert len(calls) == 2  # the tile again, with a new (CPU) predictor
    assert result.notes == [CPU_FALLBACK_NOTE]
    assert CPU_FALLBACK_NOTE in result.summary()
    assert any("GPU out of memory" in m for m in messages)
    got = sorted(f.geometry.wkt for f in result.targets[0].features)
    assert got == sorted(f.geometry.wkt for f in baseline_a.targets[0].features)


def test_cuda_out_of_memory_while_densifying_scribbles_falls_back_to_cpu(monkeypatch):
    """INJECTED (no GPU here): torch.cuda.OutOfMemoryError from SamEngine.predict on the first scribble. The
    densifier goes on with a CPU engine holding the same SAM weights (the shared engine is not moved), densifies
    the scribble there as without the error, keeps later scribbles on the CPU and says so."""
    import torch

    from core.modeling.engine import SamEngine
    from core.pipeline import DENSIFY_CPU_NOTE, load_engine, make_densifier
    from core.reference import build_reference
    from core.segment_cli import read_geometries

    demo = ROOT / "resources" / "demo"
    _, _, crs = read_geometries(str(demo / "reference_houses.geojson"))
    houses = [shape(f["geometry"]) for f in json.loads((demo / "reference_houses.geojson").read_text())["features"]]
    big = sorted(houses, key=lambda h: -h.area)[1]  # a plain rectangular roof (see test_pipeline.py)
    c = big.representative_point()
    line = f"LINESTRING ({c.x - 1.0} {c.y}, {c.x} {c.y + 0.5}, {c.x + 1.0} {c.y})"
    spec = ReferenceSpec(raster=str(demo / "reference.tif"), foreground=(line,), crs=crs)
    engine = load_engine(ModelParams(device="cpu"))
    expected = build_reference(spec, densify=make_densifier(engine))
    assert expected.densified

    real_predict = SamEngine.predict
    calls = []

    def predict_oom_once(self, image, *args, **kwargs):
        calls.append(self)
        if len(calls) == 1:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 1.00 GiB (injected by the test)")
        return real_predict(self, image, *args, **kwargs)

    monkeypatch.setattr(SamEngine, "predict", predict_oom_once)
    weights_before = {k: v.clone() for k, v in engine.sam.state_dict().items()}
    densify = make_densifier(engine)
    got = build_reference(spec, densify=densify)
    assert got.densified and densify.on_cpu and densify.note == DENSIFY_CPU_NOTE
    first, second = calls[0], calls[1]
    assert first is engine and second is not engine and second.device.type == "cpu"
    assert second.sam is not engine.sam  # a copy: the shared engine keeps its model where it was
    for k, v in second.sam.state_dict().items():
        assert torch.equal(v, weights_before[k]), k
    assert all(torch.equal(v, weights_before[k]) for k, v in engine.sam.state_dict().items())
    iou = (got.mask & expected.mask).sum() / (got.mask | expected.mask).sum()
    assert iou > 0.99, iou  # the same mask (the CPU copy may encode in PyTorch where the engine used ONNX Runtime)
    # a later scribble goes straight to the CPU engine; a second out-of-memory error is not swallowed
    n = len(calls)
    build_reference(spec, densify=densify)
    assert len(calls) == n + 1 and calls[-1] is second

    def predict_oom(self, image, *args, **kwargs):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory (injected by the test)")

    monkeypatch.setattr(SamEngine, "predict", predict_oom)
    with pytest.raises(torch.cuda.OutOfMemoryError):
        build_reference(spec, densify=densify)


def test_two_runs_at_once_in_two_threads(oam, tmp_path, baseline_a):
    """Two pipeline.run calls in two threads (one shared model): both finish, each with its own result."""
    runs = {
        "a": _params(_image(oam, TILE_A), [_largest_building(oam, TILE_A)], [_image(oam, TILE_A)],
                     tmp_path / "a.gpkg", class_name="house"),
        "b": _params(_image(oam, TILE_B), [_largest_building(oam, TILE_B)], [_image(oam, TILE_B)],
                     tmp_path / "b.gpkg", class_name="roof"),
    }
    out, errors = {}, {}

    def work(key):
        try:
            out[key] = run(runs[key])
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors[key] = exc

    threads = [threading.Thread(target=work, args=(k,)) for k in runs]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=900)
    assert not any(t.is_alive() for t in threads), "a run hangs"
    assert not errors, errors
    for key, name, cls in (("a", TILE_A, "house"), ("b", TILE_B, "roof")):
        (t,) = out[key].targets
        assert t.raster.endswith(name + ".tif")
        assert {f.attributes["class_name"] for f in t.features} == {cls}
        (geoms, _), = _layers(out[key].output).values()
        assert len(geoms) == t.n_objects
        own = _iou(geoms, oam / "masks" / f"{name}.tif")
        assert own > 0.3, (key, own)
    # the same result as run alone
    alone = [f.geometry for f in baseline_a.targets[0].features]
    together = [f.geometry for f in out["a"].targets[0].features]
    from shapely.ops import unary_union

    u1, u2 = unary_union(alone), unary_union(together)
    assert u1.symmetric_difference(u2).area < 0.01 * u1.area


def test_adapters_made_for_another_backbone_are_refused(oam, tmp_path):
    """Adapters trained around a ViT SAM given to the embedded (TinyViT) model: one ModelError sentence."""
    import torch
    from segment_anything.modeling import ImageEncoderViT

    from core.modeling.registry import build_architecture, freeze
    from core.modeling.virefsam import ViRefSAM

    torch.manual_seed(0)
    vit = build_architecture("embedded")  # SAM's prompt encoder and decoder ...
    vit.image_encoder = ImageEncoderViT(  # ... around a small 2-block ViT encoder
        depth=2, embed_dim=64, num_heads=2, img_size=1024, patch_size=16, use_rel_pos=True, window_size=14,
        global_attn_indexes=(1,), out_chans=256,
    )
    path = tmp_path / "vit_adapters.pt"
    ViRefSAM(freeze(vit)).save_adapters(path)
    img = _image(oam, TILE_A)
    params = _params(img, [_largest_building(oam, TILE_A)], [img], tmp_path / "out.gpkg", mode="virefsam",
                     model=ModelParams(device="cpu", adapters=str(path)))
    with pytest.raises(ModelError, match="another SAM backbone") as info:
        run(params)
    assert str(info.value).count(". ") == 0 and str(info.value).endswith(".")
    assert not (tmp_path / "out.gpkg").exists()


def test_web_layer_and_missing_target_refused_before_the_model(oam, tmp_path):
    img = _image(oam, TILE_A)
    building = _largest_building(oam, TILE_A)
    for target, message in (
        ("crs=EPSG:3857&format&type=xyz&url=https://tile.openstreetmap.org/%7Bz%7D/%7Bx%7D/%7By%7D.png",
         "web service"),
        ("contextualWMSLegend=0&crs=EPSG:4326&format=image/png&layers=ortho&url=https://wms.example.com/wms",
         "web service"),
        (str(tmp_path / "gone.tif"), "does not exist"),
    ):
        # the model of another device: were it loaded before the check, CUDA would be refused instead
        params = _params(img, [building], [img, target], model=ModelParams(device="cuda"))
        with pytest.raises(InputError, match=message):
            run(params)


# -- QGIS: a layer removed from the project during a run ------------------------------------------------------------
def test_layer_removed_from_the_project_during_a_run(dock, oam, qgis_iface, qgis_project, qtbot):
    """The task works on copied paths: removing the reference/target layer mid-run changes nothing; the result
    layer is added and the message bar reports success."""
    from qgis.core import Qgis, QgsGeometry, QgsRasterLayer, QgsTask, QgsVectorLayer
    from qgis_iface import set_up_run

    layer = QgsRasterLayer(str(_image(oam, TILE_A)), TILE_A)
    assert layer.isValid()
    qgis_project.addMapLayer(layer)
    labels = QgsVectorLayer(str(oam / "labels_geojson" / f"{TILE_A}.geojson"), "labels", "ogr")
    polygon = max((f.geometry() for f in labels.getFeatures()), key=lambda g: g.area())
    set_up_run(dock, layer, [QgsGeometry(polygon)], [layer])
    qgis_iface.messageBar().clearWidgets()
    task = dock.run()
    assert task is not None, [i.text() for i in qgis_iface.messageBar().items()]
    qtbot.waitUntil(lambda: task.status() == QgsTask.Running and bool(task.message), timeout=60000)
    layer_id = layer.id()
    qgis_project.removeMapLayer(layer_id)  # mid-run: the layer object is deleted
    assert qgis_project.mapLayer(layer_id) is None and not dock.references.non_empty()
    qtbot.waitUntil(lambda: not dock.is_running(), timeout=600000)
    assert task.error is None and not task.cancelled, task.error
    (result_layer,) = dock.last_layers
    assert result_layer.featureCount() > 0 and result_layer.crs().authid() == "EPSG:4326"
    texts = [(i.text(), i.level()) for i in qgis_iface.messageBar().items()]
    assert any(level == Qgis.Success and "building:" in t for t, level in texts), texts
