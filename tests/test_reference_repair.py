"""Marks as analysts draw them: a self-intersecting (bow-tie) polygon is repaired, used, and said so.

Real raster (the demo's reference cut-out), real CLI process, the real embedded SAM.
"""

import json
import subprocess
import sys
from pathlib import Path

import pytest
from shapely import wkt

from core.demo import DEMO
from core.errors import InputError
from core.params import ReferenceSpec
from core.reference import reference_set
from core.segment_cli import read_geometries

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def bowtie():
    """A bow-tie over the first demo house (its box's corners joined crosswise), in the houses' CRS."""
    fg, _, crs = read_geometries(str(DEMO / "reference_houses.geojson"))
    x0, y0, x1, y1 = wkt.loads(fg[0]).bounds
    return f"POLYGON (({x0} {y0}, {x1} {y1}, {x1} {y0}, {x0} {y1}, {x0} {y0}))", crs


def test_bowtie_reference_is_repaired_and_noted(bowtie):
    geom, crs = bowtie
    assert not wkt.loads(geom).is_valid and wkt.loads(geom).area == 0  # what used to be refused
    rs = reference_set([ReferenceSpec(str(DEMO / "reference.tif"), (geom,), crs=crs, ref_id="bow")])
    assert len(rs.refs) == 1 and rs.refs[0].mask.sum() > 1000
    assert rs.notes and "repaired" in rs.notes[0] and "self-intersection" in rs.notes[0]


def test_unrepairable_polygon_names_the_problem(bowtie):
    _, crs = bowtie
    flat = "POLYGON ((0 0, 10 0, 20 0, 0 0))"  # a ring with no area at all
    with pytest.raises(InputError, match="cannot be repaired"):
        reference_set([ReferenceSpec(str(DEMO / "reference.tif"), (flat,), crs=crs)])


def test_bowtie_reference_through_the_cli(bowtie, tmp_path):
    geom, crs = bowtie
    gj = tmp_path / "bowtie.geojson"
    gj.write_text(json.dumps({
        "type": "FeatureCollection", "crs": {"type": "name", "properties": {"name": crs}},
        "features": [{"type": "Feature", "properties": {}, "geometry": wkt.loads(geom).__geo_interface__}],
    }))
    out = tmp_path / "out.gpkg"
    proc = subprocess.run(
        [sys.executable, "-m", "core", "segment", "--reference", str(DEMO / "reference.tif"),
         "--reference-geometry", str(gj), "--targets", str(DEMO / "target_kampala.tif"), "--out", str(out),
         "--mode", "training_free", "--device", "cpu", "--quiet"],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr
    assert out.is_file() and "Wrote" in proc.stdout
    assert "invalid polygon was repaired (self-intersection)" in proc.stderr
