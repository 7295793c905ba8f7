"""Several classes in one run: parameters, the pipeline (one layer per target with a class attribute, overlaps),
the CLI's classes file and the bench row. Real rasters (the demo's cut-outs), the real embedded SAM."""

import json
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
from osgeo import ogr

from core.demo import DEMO
from core.errors import InputError
from core.params import ClassSpec, ModelParams, ReferenceSpec, RunParams
from core.segment_cli import read_geometries

ROOT = Path(__file__).resolve().parents[1]
TARGET = str(DEMO / "target_kampala.tif")
# a patch of bare ground and shrubs beside the demo's houses (EPSG:3857), as a second class
GROUND = "POLYGON ((4368380 -673950, 4368390 -673950, 4368390 -673960, 4368380 -673960, 4368380 -673950))"


@pytest.fixture(scope="module")
def houses():
    fg, _, crs = read_geometries(str(DEMO / "reference_houses.geojson"))
    return ReferenceSpec(str(DEMO / "reference.tif"), fg, crs=crs, ref_id="houses")


def _two(houses, second, **kw):
    return RunParams("building+ground", (), (TARGET,), model=ModelParams(device="cpu"), mode="training_free",
                     classes=(ClassSpec("building", (houses,)), ClassSpec(second[0], second[1])), **kw)


def test_class_specs_round_trip_and_old_files_load(houses):
    p = _two(houses, ("ground", (ReferenceSpec(str(DEMO / "reference.tif"), (GROUND,), crs="EPSG:3857"),)))
    back = RunParams.from_json(p.to_json())
    assert back == p and [c.name for c in back.class_specs()] == ["building", "ground"]
    old = json.loads(RunParams("building", (houses,), (TARGET,)).to_json())
    del old["classes"], old["allow_overlap"], old["layer_per_class"]  # written before several classes existed
    one = RunParams.from_dict(old)
    assert one.class_specs() == (ClassSpec("building", (houses,)),) and not one.allow_overlap
    assert not one.layer_per_class  # one layer per target, as before
    per_class = RunParams.from_json(_two(houses, ("ground", p.classes[1].references), layer_per_class=True).to_json())
    assert per_class.layer_per_class


def test_bad_class_lists_are_one_sentence(houses):
    with pytest.raises(InputError, match="Two classes are named 'building'"):
        _two(houses, ("building", (houses,)))
    with pytest.raises(InputError, match="Class 'tree' has no reference"):
        _two(houses, ("tree", ()))
    with pytest.raises(InputError, match="Several classes in one run go on this computer only"):
        _two(houses, ("tree", (houses,)), cluster="local:2")


def test_two_class_run_writes_one_layer_with_both_classes(houses, tmp_path):
    from core.pipeline import run

    ground = (ReferenceSpec(str(DEMO / "reference.tif"), (GROUND,), crs="EPSG:3857", ref_id="ground"),)
    out = tmp_path / "two.gpkg"
    import dataclasses

    result = run(dataclasses.replace(_two(houses, ("ground", ground)), output=str(out)))
    feats = result.targets[0].features
    counts = Counter(f.attributes["class_name"] for f in feats)
    assert counts["building"] > 5 and counts["ground"] > 0, counts
    assert {f.attributes["ref_id"] for f in feats} == {"houses", "ground"}
    # no pixel claimed by both classes (the more probable one keeps it)
    b = [f.geometry for f in feats if f.attributes["class_name"] == "building"]
    g = [f.geometry for f in feats if f.attributes["class_name"] == "ground"]
    from shapely.ops import unary_union

    assert unary_union(b).intersection(unary_union(g)).area < 1.0  # m2: borders only
    ds = ogr.Open(str(out))
    assert ds.GetLayerCount() == 1
    layer = ds.GetLayer(0)
    assert Counter(f.GetField("class_name") for f in layer) == counts  # the attribute is in the file
    saved = RunParams.from_json(Path(str(out) + ".params.json").read_text())
    assert [c.name for c in saved.class_specs()] == ["building", "ground"]


def test_overlap_goes_to_the_more_probable_class_unless_allowed(houses):
    """Two classes with the same marks have the same probabilities: without overlap every pixel goes to one of
    them (the first, on ties); with overlap allowed both get every polygon."""
    from core.pipeline import run

    same = (ReferenceSpec(houses.raster, houses.foreground, crs=houses.crs, ref_id="houses_b"),)
    one = Counter(f.attributes["class_name"] for f in run(_two(houses, ("copy", same))).targets[0].features)
    both = Counter(f.attributes["class_name"]
                   for f in run(_two(houses, ("copy", same), allow_overlap=True)).targets[0].features)
    assert one["building"] > 5 and one["copy"] == 0, one
    assert both["building"] == both["copy"] == one["building"], both


def _classes_file(tmp_path):
    """A classes file of two classes on the demo's reference raster: its houses, and a patch of bare ground."""
    gj = tmp_path / "ground.geojson"
    gj.write_text(json.dumps({"type": "FeatureCollection",
                              "crs": {"type": "name", "properties": {"name": "EPSG:3857"}},
                              "features": [{"type": "Feature", "properties": {},
                                            "geometry": {"type": "Polygon", "coordinates": [[
                                                [4368380, -673950], [4368390, -673950], [4368390, -673960],
                                                [4368380, -673960], [4368380, -673950]]]}}]}))
    classes = tmp_path / "classes.json"
    classes.write_text(json.dumps([
        {"name": "building", "references": [{"raster": str(DEMO / "reference.tif"),
                                             "geometry": str(DEMO / "reference_houses.geojson")}]},
        {"name": "ground", "references": [{"raster": str(DEMO / "reference.tif"), "geometry": str(gj)}]},
    ]))
    return classes


def test_classes_file_through_the_cli(houses, tmp_path):
    classes = _classes_file(tmp_path)
    out = tmp_path / "cli.gpkg"
    proc = subprocess.run([sys.executable, "-m", "core", "segment", "--classes", str(classes), "--targets", TARGET,
                           "--out", str(out), "--mode", "training_free", "--device", "cpu", "--quiet"],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    ds = ogr.Open(str(out))  # kept: a layer outlives its dataset only in a crash
    assert {f.GetField("class_name") for f in ds.GetLayer(0)} == {"building", "ground"}
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps([{"name": "x"}]))
    proc = subprocess.run([sys.executable, "-m", "core", "segment", "--classes", str(bad), "--targets", TARGET,
                           "--out", str(tmp_path / "b.gpkg"), "--quiet"], cwd=ROOT, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "Class 'x' has no reference" in proc.stderr


def test_bench_two_class_row_encodes_each_tile_once(tmp_path):
    import argparse

    from core import bench

    p = argparse.ArgumentParser()
    bench.add_arguments(p)
    args = p.parse_args(["--out", str(tmp_path)])
    target = bench.mosaic_vrt(TARGET, 512, str(tmp_path / "t.vrt"))
    one = bench.run_e2e(args, [target], str(tmp_path / "one.gpkg"), variant="baseline", log=lambda *a: None)
    two = bench.run_e2e(args, [target], str(tmp_path / "two.gpkg"), variant="twoclass", log=lambda *a: None)
    assert two["tiles"] == one["tiles"] >= 1
    assert two["encoder_calls"]["tiles"] == one["encoder_calls"]["tiles"] == one["tiles"]  # shared plain pass
    assert two["encoder_calls"]["reference"] == 1  # the second class's marks: the same crop, encoded once


def test_one_layer_per_class_in_gpkg_and_shp(tmp_path):
    """layer_per_class: the writers make one layer per target and class (GeoPackage tables, Shapefiles), named
    TARGET_CLASS, each with that class's polygons only; an existing one is refused before anything is written."""
    from shapely.geometry import box

    from core.results import Feature, TargetResult
    from core.writers import layer_names, write_results

    def feat(cls, x):
        return Feature(box(x, 0, x + 1, 1), {"class_name": cls, "source": "a.tif"})

    results = [TargetResult("/d/kampala.tif", "EPSG:3857", [feat("building", 0), feat("ground", 2), feat("building", 4)]),
               TargetResult("/d/zanzibar.tif", "EPSG:3857", [feat("ground", 0)])]
    classes = ["building", "ground"]
    assert layer_names([r.raster for r in results], classes) == [
        "kampala_building", "kampala_ground", "zanzibar_building", "zanzibar_ground"]
    written = write_results(str(tmp_path / "out.gpkg"), results, "gpkg", classes=classes)
    ds = ogr.Open(written[0])
    got = {ds.GetLayer(i).GetName(): Counter(f.GetField("class_name") for f in ds.GetLayer(i))
           for i in range(ds.GetLayerCount())}
    assert got == {"kampala_building": {"building": 2}, "kampala_ground": {"ground": 1},
                   "zanzibar_building": {}, "zanzibar_ground": {"ground": 1}}
    ds = None
    written = write_results(str(tmp_path / "out.shp"), results, "shp", classes=classes)
    assert [Path(w).name for w in written] == [f"out_{n}.shp" for n in got]
    datasets = [ogr.Open(w) for w in written]  # kept open: a layer outlives its dataset only in a crash
    assert [d.GetLayer(0).GetFeatureCount() for d in datasets] == [2, 1, 0, 1]
    datasets = None
    with pytest.raises(InputError, match="already exists"):
        write_results(str(tmp_path / "out.shp"), results, "shp", classes=classes)
    assert write_results(str(tmp_path / "one.gpkg"), results[:1], "gpkg") == [str(tmp_path / "one.gpkg")]
    ds = ogr.Open(str(tmp_path / "one.gpkg"))
    assert ds.GetLayerCount() == 1  # the default: one layer per target


def test_layer_per_class_through_the_cli(houses, tmp_path):
    classes = _classes_file(tmp_path)
    out = tmp_path / "cli.shp"
    proc = subprocess.run([sys.executable, "-m", "core", "segment", "--classes", str(classes), "--targets", TARGET,
                           "--out", str(out), "--mode", "training_free", "--device", "cpu", "--quiet",
                           "--layer-per-class"], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    for cls in ("building", "ground"):
        ds = ogr.Open(str(tmp_path / f"cli_target_kampala_{cls}.shp"))
        names = {f.GetField("class_name") for f in ds.GetLayer(0)}
        assert names == {cls}, (cls, names)
        ds = None
    saved = RunParams.from_json((tmp_path / "cli_target_kampala_building.shp.params.json").read_text())
    assert saved.layer_per_class
    (tmp_path / "cli_target_kampala_building.shp").unlink()  # one of the class files is left: refused all the same
    proc = subprocess.run([sys.executable, "-m", "core", "segment", "--classes", str(classes), "--targets", TARGET,
                           "--out", str(out), "--quiet", "--layer-per-class"], cwd=ROOT, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert f"The output file {tmp_path / 'cli_target_kampala_ground.shp'} exists already" in proc.stderr
