"""Bad input an analyst can give to corrections and several-class runs (docs/FAULTS.md, "References"): each ends in
one sentence, exit code 2 from ``python -m core segment``, no traceback and no output file.

Real files: the demo's reference and Kampala cut-outs, a copy of the Kampala cut-out with nodata on its left half,
real GeoJSON and classes files, real CLI processes (each refusal comes before the model loads).
"""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from core.demo import DEMO
from core.errors import InputError
from core.params import ClassSpec, ReferenceSpec, RunParams
from core.segment_cli import read_geometries

ROOT = Path(__file__).resolve().parents[1]
TARGET = str(DEMO / "target_kampala.tif")
# a 10 m square on the left half of the Kampala cut-out (EPSG:3857)
LEFT_BOX = [[3628320, 39120], [3628330, 39120], [3628330, 39110], [3628320, 39110], [3628320, 39120]]


def _geojson(path: Path, polygons) -> str:
    path.write_text(json.dumps({
        "type": "FeatureCollection", "crs": {"type": "name", "properties": {"name": "EPSG:3857"}},
        "features": [{"type": "Feature", "properties": {}, "geometry": {"type": "Polygon", "coordinates": [p]}}
                     for p in polygons]}))
    return str(path)


def _cli(tmp_path, *args):
    out = tmp_path / "out.gpkg"
    proc = subprocess.run([sys.executable, "-m", "core", "segment", "--targets", TARGET, "--out", str(out),
                           "--device", "cpu", "--quiet", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), proc.stderr
    assert not out.exists() and not Path(str(out) + ".params.json").exists()
    return lines[0]


def _reference():
    return ["--reference", str(DEMO / "reference.tif"), "--reference-geometry", str(DEMO / "reference_houses.geojson")]


@pytest.fixture(scope="module")
def half_nodata(tmp_path_factory):
    """The Kampala cut-out with its left half set to 0 and 0 declared nodata."""
    import rasterio

    path = tmp_path_factory.mktemp("nodata") / "half_nodata.tif"
    with rasterio.open(TARGET) as ds:
        data, profile = ds.read(), ds.profile
    data[:, :, :512] = 0
    profile.update(nodata=0, compress="deflate", photometric="rgb")
    with rasterio.open(path, "w", **profile) as ds:
        ds.write(data)
    return str(path)


def test_negative_marks_only_on_nodata(half_nodata, tmp_path):
    from core.reference import reference_set

    fg, _, crs = read_geometries(str(DEMO / "reference_houses.geojson"))
    houses = ReferenceSpec(str(DEMO / "reference.tif"), fg, crs=crs, ref_id="houses")
    box = "POLYGON ((" + ", ".join(f"{x} {y}" for x, y in LEFT_BOX) + "))"
    with pytest.raises(InputError, match=r"^The negative marks of reference 'neg1' cover no valid pixel of "
                                         r"'half_nodata.tif' \(nodata\)\.$"):
        reference_set([houses, ReferenceSpec(half_nodata, (), (box,), crs="EPSG:3857", ref_id="neg1")])
    neg = _geojson(tmp_path / "neg.geojson", [LEFT_BOX])
    line = _cli(tmp_path, *_reference(), "--negative-geometry", f"{neg}@{half_nodata}")
    assert line == "error: The negative marks of reference 'neg1' cover no valid pixel of 'half_nodata.tif' (nodata)."


def test_negative_geometry_file_without_geometry(tmp_path):
    empty = _geojson(tmp_path / "empty.geojson", [])
    line = _cli(tmp_path, *_reference(), "--negative-geometry", empty)
    assert line == f"error: {empty} holds no geometry to use as negative examples."


def test_a_class_without_a_name(tmp_path):
    fg, _, crs = read_geometries(str(DEMO / "reference_houses.geojson"))
    houses = ReferenceSpec(str(DEMO / "reference.tif"), fg, crs=crs, ref_id="houses")
    with pytest.raises(InputError, match=r"^A class has no name: give every class a name \(e.g. building, tree\)\.$"):
        RunParams("building+", (), (TARGET,), classes=(ClassSpec("building", (houses,)), ClassSpec("  ", (houses,))))
    ref = {"raster": str(DEMO / "reference.tif"), "geometry": str(DEMO / "reference_houses.geojson")}
    classes = tmp_path / "classes.json"
    classes.write_text(json.dumps([{"name": "building", "references": [ref]}, {"references": [ref]}]))
    line = _cli(tmp_path, "--classes", str(classes))
    assert line == "error: A class has no name: give every class a name (e.g. building, tree)."


@pytest.mark.parametrize("content, sentence", [
    ("[{\"name\": \"building\",", "The classes file {f} is not JSON ("),
    ("{\"name\": \"building\"}", "The classes file {f} must hold a list of classes, each with a name and references."),
    ("[]", "The classes file {f} must hold a list of classes, each with a name and references."),
    ("[{\"name\": \"tree\", \"references\": [{\"raster\": \"r.tif\"}]}]",
     "Each reference of class 'tree' in {f} needs a raster and a geometry file."),
], ids=["not JSON", "not a list", "empty list", "reference without geometry"])
def test_a_bad_classes_file(tmp_path, content, sentence):
    classes = tmp_path / "classes.json"
    classes.write_text(content)
    line = _cli(tmp_path, "--classes", str(classes))
    assert line.startswith("error: " + sentence.format(f=classes)), line
    assert line.endswith(".")
