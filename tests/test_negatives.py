"""Negative examples ("Not <class>" marks on a target raster): references, prototypes, runs, the CLI, a
measured round of corrections.

Real rasters (the demo's reference cut-out, a window of the shared Kampala orthophoto and its OSM footprints),
the real embedded SAM with the shipped adapters, real CLI processes.
"""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from core import corrections
from core.demo import DEMO
from core.errors import InputError
from core.params import ReferenceSpec, RunParams
from core.reference import reference_set
from core.segment_cli import read_geometries

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def houses():
    fg, _, crs = read_geometries(str(DEMO / "reference_houses.geojson"))
    return ReferenceSpec(str(DEMO / "reference.tif"), fg, crs=crs, ref_id="houses")


@pytest.fixture(scope="module")
def kampala(tmp_path_factory, shared_data):
    """The Kampala window of ``python -m core corrections`` (target VRT, truth VRT)."""
    out = tmp_path_factory.mktemp("kampala")
    return corrections.scene_window("kampala", shared_data / "oam_mosaics", out)


@pytest.fixture(scope="module")
def first_round(kampala, houses):
    """A default run (shipped adapters) on the Kampala window and its five false positives by the fixed rule."""
    from core.pipeline import run

    target, truth = kampala
    params = RunParams("building", (houses,), (target,))
    result = run(params)
    mask, transform, crs = corrections._truth(truth)
    geoms = [f.geometry for f in result.targets[0].features]
    picked = corrections.false_positives(geoms, mask, transform, 5)
    assert len(picked) == 5
    return params, result, picked, crs


def test_background_only_reference_on_a_target_is_a_negative_example(kampala, houses):
    target, _ = kampala
    box = "POLYGON ((3628330 39120, 3628340 39120, 3628340 39110, 3628330 39110, 3628330 39120))"
    bow = "POLYGON ((3628350 39100, 3628360 39090, 3628360 39100, 3628350 39090, 3628350 39100))"  # a bow-tie
    neg = ReferenceSpec(target, (), (box, bow), crs="EPSG:3857", ref_id="not_building")
    rs = reference_set([houses, neg])
    assert len(rs.refs) >= 1 and all(r.kind != "negative" for r in rs.refs)
    assert len(rs.negatives) == 1 and rs.negatives[0].kind == "negative"
    n = rs.negatives[0]
    assert not n.mask.any() and n.background.sum() > 1000 and n.image.shape[:2] == n.background.shape
    assert any("not_building" in s and "repaired" in s for s in rs.notes)
    # the working scale is chosen from the class's marks only: the same with and without the negative
    assert rs.scale == reference_set([houses]).scale


def test_a_class_needs_one_reference_with_foreground(kampala):
    target, _ = kampala
    box = "POLYGON ((3628330 39120, 3628340 39120, 3628340 39110, 3628330 39110, 3628330 39120))"
    with pytest.raises(InputError, match="has only background marks; mark at least one example of the class"):
        reference_set([ReferenceSpec(target, (), (box,), crs="EPSG:3857", ref_id="only_neg")])
    far = "POLYGON ((0 0, 10 0, 10 10, 0 10, 0 0))"
    with pytest.raises(InputError, match="negative \\(background\\) marks of reference 'n' lie outside"):
        reference_set([ReferenceSpec(str(DEMO / "reference.tif"), ("POINT (4368400 -673990)",), crs="EPSG:3857"),
                       ReferenceSpec(target, (), (far,), crs="EPSG:3857", ref_id="n")])


def test_negatives_are_extra_background_prototypes_in_every_mode(engine, kampala, houses):
    from core.modeling.predictor import ReferencePredictor
    from core.modeling.prototypes import negative_prototypes

    target, _ = kampala
    boxes = ("POLYGON ((3628330 39120, 3628340 39120, 3628340 39110, 3628330 39110, 3628330 39120))",
             "POLYGON ((3628370 39080, 3628380 39080, 3628380 39070, 3628370 39070, 3628370 39080))")
    rs = reference_set([houses, ReferenceSpec(target, (), boxes, crs="EPSG:3857", ref_id="neg")])
    shots = [(r.image, r.mask) for r in rs.refs]
    negs = [(r.image, r.background) for r in rs.negatives]
    for mode, adapters in (("training_free", None), ("virefsam", str(ROOT / "resources/adapters/embedded_virefsam.pt"))):
        plain = ReferencePredictor(engine, mode=mode, adapters=adapters)
        plain.set_references(shots)
        pred = ReferencePredictor(engine, mode=mode, adapters=adapters)
        pred.set_references(shots, negs)
        assert pred.n_negatives == 2
        n_b = plain._protos.n_bg
        assert pred._protos.n_bg == n_b + 2
        assert torch.equal(pred._protos.bg[:, :n_b], plain._protos.bg)  # the Voronoi rows are unchanged
        # the state a cluster worker gets carries them, and which rows they are
        state = pred.reference_state()
        other = ReferencePredictor(engine, mode=mode, adapters=adapters)
        other.load_reference_state(state)
        assert other.n_negatives == 2 and other._neg_rows == 2
    # a region covering no cell is an invalid row, not a NaN
    p, ok = negative_prototypes(torch.ones(1, 4, 8, 8), torch.zeros(1, 8, 8))
    assert not bool(ok[0]) and torch.isfinite(p).all()


def test_marked_false_positives_are_gone_in_the_next_run(first_round):
    """The analyst's loop: five wrong polygons marked 'Not building', the next run has none at those places (with
    self-support, the default since session 21: one edge of one place is touched by a neighbour, 1.4% of its
    area; 2 places came back before session 21's filter)."""
    import dataclasses

    from core.pipeline import run

    params, result, picked, crs = first_round
    before = [f.geometry for f in result.targets[0].features]
    assert all(any(g.intersects(b) for b in before) for g in picked)
    neg = ReferenceSpec(params.targets[0], (), tuple(g.wkt for g in picked), crs=crs, ref_id="not_building")
    again = run(dataclasses.replace(params, references=params.references + (neg,)))
    after = [f.geometry for f in again.targets[0].features]
    hits = sum(1 for g in picked if any(g.buffer(-0.05).intersects(a) for a in after))
    assert hits <= 1, hits  # measured: 0 of 5
    assert any("5 negative examples" in n for n in again.notes)
    # the class is still found: most of the area (polygon counts move with merges and the speck filter)
    assert sum(g.area for g in after) > 0.5 * sum(g.area for g in before)


def test_marked_places_stay_out_without_self_support(first_round):
    """The same loop with self-support turned off in the second run (the default decodes each target once more with
    its own objects; its foreground leaves out cells like the negatives and the objects it adds go through their
    filter): none of the 5 places back either."""
    import dataclasses

    from core.pipeline import run

    params, result, picked, crs = first_round
    neg = ReferenceSpec(params.targets[0], (), tuple(g.wkt for g in picked), crs=crs, ref_id="not_building")
    again = run(dataclasses.replace(params, references=params.references + (neg,), self_support=False))
    after = [f.geometry for f in again.targets[0].features]
    hits = sum(1 for g in picked if any(g.buffer(-0.05).intersects(a) for a in after))
    assert hits <= 1, hits
    assert sum(g.area for g in after) > 0.5 * sum(f.geometry.area for f in result.targets[0].features)


def test_one_round_of_corrections_raises_precision_without_lowering_iou(kampala, houses):
    """Issue #19's goal on the Kampala window: +0.05 precision, IoU not lower (measured +0.117 / +0.084; the
    README's numbers come from ``python -m core corrections``)."""
    target, truth = kampala
    r = corrections.correction_round(corrections.scene_params("kampala", target, device="cpu"), truth, 5)
    assert r["negatives"] == 5
    assert r["after"]["precision"] >= r["before"]["precision"] + 0.05, r
    assert r["after"]["iou"] >= r["before"]["iou"], r


def test_negative_geometry_through_the_cli_and_its_params_file(first_round, kampala, tmp_path):
    params, result, picked, crs = first_round
    target, _ = kampala
    gj = tmp_path / "wrong.geojson"
    gj.write_text(json.dumps({
        "type": "FeatureCollection", "crs": {"type": "name", "properties": {"name": crs}},
        "features": [{"type": "Feature", "properties": {}, "geometry": g.__geo_interface__} for g in picked],
    }))
    out = tmp_path / "out.gpkg"
    base = [sys.executable, "-m", "core", "segment", "--reference", str(DEMO / "reference.tif"),
            "--reference-geometry", str(DEMO / "reference_houses.geojson"), "--targets", target,
            "--device", "cpu", "--quiet", "--class-name", "building"]
    proc = subprocess.run(base + ["--negative-geometry", str(gj), "--out", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    assert "5 negative examples (marked 'not building') used" in proc.stderr
    saved = RunParams.from_json(Path(str(out) + ".params.json").read_text())
    neg = [r for r in saved.references if not r.foreground]
    assert len(neg) == 1 and neg[0].raster == target and len(neg[0].background) == 5  # found the raster itself
    # geometries on no target: one sentence naming the way out
    far = tmp_path / "far.geojson"
    far.write_text(json.dumps({"type": "FeatureCollection", "crs": {"type": "name", "properties": {"name": crs}},
                               "features": [{"type": "Feature", "properties": {}, "geometry": {
                                   "type": "Point", "coordinates": [0.0, 0.0]}}]}))
    proc = subprocess.run(base + ["--negative-geometry", str(far), "--out", str(tmp_path / "x.gpkg")],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 2
    assert "lie on none of the target rasters; name their raster as" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_each_negative_region_is_one_example_when_crops_overlap():
    """Two marks in opposite corners of the 1024-px demo reference are two clusters whose crops are both the whole
    raster: each region must be one negative example, not one per crop it falls in."""
    from scipy import ndimage

    from core.reference import negative_references

    import rasterio

    with rasterio.open(DEMO / "reference.tif") as ds:
        t = ds.transform

    def square(c, r, n=20):
        (a, b), (e, f) = t * (c, r), t * (c + n, r + n)
        return f"POLYGON (({a} {b}, {e} {b}, {e} {f}, {a} {f}, {a} {b}))"

    spec = ReferenceSpec(str(DEMO / "reference.tif"), (), (square(10, 10), square(990, 990)), crs="EPSG:3857",
                         ref_id="not_building")
    negs = negative_references(spec)
    # two clusters, two crops, both the whole raster: the second holds no region of its own and is left out
    assert len(negs) == 1
    assert sum(ndimage.label(n.background)[1] for n in negs) == 2  # before: 2 crops x 2 regions
