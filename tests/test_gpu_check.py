"""`make gpu-check` on this CPU machine, and the engine where GDAL's Python bindings are missing (a bare CUDA
machine's pip environment: the GPU check's setting).

Real processes: scripts/gpu_check.py as `make gpu-check` starts it; a Python in which `import osgeo` fails (the
module entry set to None before anything imports it, as Python does for a package that is not there) running
the real pipeline on the demo's reference and a real target window.
"""

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from pyproj import CRS
from shapely import wkt

from core.demo import DEMO
from core.errors import InputError
from core.segment_cli import read_geojson, read_geometries

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_check_on_a_cpu_machine_says_cuda_is_absent(tmp_path):
    out = tmp_path / "gpu-check"
    p = subprocess.run([sys.executable, "scripts/gpu_check.py", "--out", str(out), "--no-setup", "--budget", "240"],
                       cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    assert "CUDA is absent on this machine" in p.stdout.strip().splitlines()[-1]
    report = json.loads((out / "gpu_check.json").read_text())
    assert report["cuda"] is False and report["summary"].startswith("CUDA is absent")
    assert not report.get("missing_imports")
    assert report["steps"]["weights"]["rc"] == 0
    enc = report["steps"]["encoder_cpu"]["result"]["embedded"]
    assert enc["torch_fp32"]["seconds"] > 0  # the CPU smoke ran the real encoder
    md = (out / "gpu_check.md").read_text()
    assert "CUDA is absent on this machine" in md and "Image encoder" in md
    p3 = subprocess.run([sys.executable, "scripts/gpu_check.py", "--out", str(out), "--no-setup", "--require-cuda",
                         "--budget", "60"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert p3.returncode == 3


def test_geojson_without_gdal_reads_what_ogr_reads(tmp_path):
    path = DEMO / "reference_houses.geojson"
    fg, bg, crs = read_geometries(str(path))
    fg2, bg2, crs2 = read_geojson(str(path))
    assert len(fg2) == len(fg) > 0 and bg2 == bg == ()
    assert all(wkt.loads(a).equals_exact(wkt.loads(b), 1e-6) for a, b in zip(fg, fg2))  # OGR: 15 digits
    assert CRS.from_wkt(crs2).equals(CRS.from_wkt(crs), ignore_axis_order=True)
    # GeoJSON's default CRS (WGS 84 lon/lat) and the role field of background marks
    doc = {"type": "FeatureCollection", "features": [
        {"type": "Feature", "properties": {"role": "background"},
         "geometry": {"type": "Point", "coordinates": [39.2, -6.1]}},
        {"type": "Feature", "properties": {}, "geometry": {"type": "Point", "coordinates": [39.3, -6.2]}},
        {"type": "Feature", "properties": {}, "geometry": None}]}
    f = tmp_path / "marks.geojson"
    f.write_text(json.dumps(doc))
    fg, bg, crs = read_geometries(str(f))
    fg2, bg2, crs2 = read_geojson(str(f))
    assert [wkt.loads(w).coords[0] for w in fg2] == [wkt.loads(w).coords[0] for w in fg] == [(39.3, -6.2)]
    assert [wkt.loads(w).coords[0] for w in bg2] == [wkt.loads(w).coords[0] for w in bg] == [(39.2, -6.1)]
    assert CRS.from_wkt(crs2).equals(CRS.from_wkt(crs), ignore_axis_order=True)
    bad = tmp_path / "bad.geojson"  # an unknown geometry type: one sentence, as OGR's refusal
    bad.write_text(json.dumps({"type": "Feature", "properties": {}, "geometry": {"type": "Blob", "coordinates": []}}))
    with pytest.raises(InputError, match="is not a GeoJSON file that can be read without GDAL"):
        read_geojson(str(bad))


NO_GDAL = textwrap.dedent(r"""
    import json, sys
    sys.modules["osgeo"] = None  # `import osgeo` now fails as it does where the package is absent
    from core.demo import DEMO, TARGETS
    from core.errors import InputError
    from core.params import ModelParams, ReferenceSpec, RunParams
    from core.pipeline import run, vector_writing_available
    from core.segment_cli import read_geometries
    from core.tiling import TileGrid
    fg, bg, crs = read_geometries(str(DEMO / "reference_houses.geojson"))
    params = RunParams(class_name="building", references=(ReferenceSpec(str(DEMO / "reference.tif"), fg, crs=crs),),
                       targets=(str(TARGETS["kampala"]),), mode="training_free",
                       model=ModelParams(adapters=None, device="cpu"))
    res = run(params)
    try:
        read_geometries(sys.argv[2])
        unreadable = ""
    except InputError as e:
        unreadable = str(e)
    try:
        run(RunParams(**{**params.__dict__, "output": sys.argv[1]}))
        refused = ""
    except InputError as e:
        refused = str(e)
    print(json.dumps({"writing": vector_writing_available(), "features": len(res.targets[0].features),
                      "output": res.output, "refused": refused, "unreadable": unreadable}))
""")


def test_the_engine_runs_without_gdal_bindings_when_no_file_is_written(tmp_path):
    gpkg = tmp_path / "marks.gpkg"
    gpkg.write_bytes(b"not read")
    out = tmp_path / "out.gpkg"
    p = subprocess.run([sys.executable, "-c", NO_GDAL, str(out), str(gpkg)], cwd=ROOT, capture_output=True,
                       text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-2000:]
    r = json.loads(p.stdout.strip().splitlines()[-1])
    assert r["writing"] is False and r["output"] is None
    assert r["features"] > 0  # the run found houses, in memory
    assert r["refused"].startswith(f"Writing {out} needs GDAL's Python bindings (osgeo)")
    assert "\n" not in r["refused"] and not out.exists()
    assert "cannot be read without GDAL's Python bindings" in r["unreadable"]
