"""``adapters="auto"``: the check on the reference that weighs the shipped adapters files (core.choice), and the
blend of their probabilities (core.modeling.blend).

The real embedded SAM, the two real shipped files, the demo's real reference and a real target, a real OAM tile;
the eval command on a tiny synthetic dataset weighing the two files per episode.
"""

import json

import numpy as np
import pytest

from core.choice import FLOOR, Check, beyond_marks, blend_weights, marks_complete, touching_counts, touching_iou
from core.engines import adapter_candidates, default_adapters, objects_adapters, resolve_adapters
from core.params import ModelParams


def test_touching_iou_leaves_out_objects_away_from_the_marks():
    marks = np.zeros((40, 40), bool)
    marks[5:15, 5:15] = True  # one marked object of 100 px
    prob = np.zeros((40, 40), np.float32)
    prob[5:15, 5:13] = 0.9  # found: 80 of its 100 px
    prob[25:35, 25:35] = 0.9  # an unmarked object: an analyst marks a few of many, so no error
    assert touching_iou(prob, marks) == (80, 100)
    prob[15:20, 5:15] = 0.8  # the found object spills 50 px over the marks: that counts
    assert touching_iou(prob, marks) == (80, 100 + 50)
    assert touching_iou(np.zeros((40, 40)), marks) == (0, 100)
    # what is found beyond the marks: the unmarked object, 100 px, against 100 marked px
    assert touching_counts(prob, marks) == (80, 150, 100, 100)


def test_marks_look_complete_when_the_kept_files_find_little_beyond_them():
    """tune_files "auto": the weighted share of foreground beyond the marks decides; a file left out of the blend
    does not count (the demo's four houses: the buildings file finds about 6x the marked area beyond them)."""
    demo = [Check(iou=0.79, outside=6.09), Check(iou=0.50, outside=0.24)]
    assert beyond_marks([1.0, 0.0], demo) == pytest.approx(6.09) and not marks_complete([1.0, 0.0], demo)
    complete = [Check(iou=0.8, outside=0.2), Check(iou=0.8, outside=1.4)]
    assert beyond_marks([0.5, 0.5], complete) == pytest.approx(0.8) and marks_complete([0.5, 0.5], complete)
    assert not marks_complete([0.2, 0.8], complete)


def test_the_checks_become_weights_and_a_clearly_worse_file_is_left_out():
    assert blend_weights([0.5, 0.5]) == [0.5, 0.5]  # the same check: the same weight
    a, b = blend_weights([0.50, 0.55])
    assert 0.2 < a < 0.3 and abs(a + b - 1) < 1e-9  # a softmax at temperature 0.05: e^-1 / (1 + e^-1)
    assert blend_weights([0.80, 0.52]) == [1.0, 0.0]  # the demo's houses: the objects file would weigh < FLOOR
    assert blend_weights([0.10, 0.90]) == [0.0, 1.0] and blend_weights([0.0, 0.0]) == [0.5, 0.5]
    w = blend_weights([0.6, 0.5, 0.2])
    assert w[2] == 0.0 and all(v >= FLOOR for v in w[:2]) and abs(sum(w) - 1) < 1e-9


def test_auto_offers_the_shipped_files_default_first():
    shipped, objects = default_adapters("embedded"), objects_adapters("embedded")
    if shipped is None or objects is None:
        pytest.skip("the two adapters files are not shipped for the embedded model")
    assert adapter_candidates(ModelParams(adapters="auto")) == [shipped, objects]
    assert resolve_adapters(ModelParams(adapters="auto")) == shipped  # without references: the default file
    assert adapter_candidates(ModelParams(adapters="default")) == [shipped]
    assert adapter_candidates(ModelParams(adapters=None)) == []
    if default_adapters("vit_b") is None:  # nothing shipped for the model: no choice, the run is training-free
        assert adapter_candidates(ModelParams(name="vit_b", adapters="auto")) == []


def test_a_run_with_auto_says_which_files_it_weighed_and_records_them(tmp_path):
    """The demo's four marked houses keep the buildings file alone; the note says so with both checks, and the
    parameters written beside the output name the file used, so the run replays without checking again."""
    import dataclasses

    from core.demo import TARGETS, demo_params
    from core.pipeline import run

    if objects_adapters("embedded") is None:
        pytest.skip("no second adapters file is shipped")
    params = dataclasses.replace(demo_params(tmp_path, device="cpu", adapters="auto"),
                                 targets=(str(TARGETS["kampala"]),), tune_files="auto")
    result = run(params)
    (note,) = [n for n in result.notes if n.startswith("Adapters auto:")]
    assert "embedded_virefsam.pt alone" in note and "embedded_virefsam_objects.pt" in note, note
    # four houses of many marked: the DTA file is not tuned (tune_files "auto" resolved to "vcp_alone")
    (tuning,) = [n for n in result.notes if n.startswith("Tuning only a file without DTA")]
    assert "a few of many" in tuning, tuning
    written = json.loads((tmp_path / "demo.gpkg.params.json").read_text())
    assert written["model"]["adapters"] == str(default_adapters("embedded"))
    assert written["model"]["adapter_weights"] == []
    assert written["tune_files"] == "vcp_alone"
    assert sum(len(t.features) for t in result.targets) > 0


def test_a_blend_is_the_weighted_mean_of_both_files_and_replays_from_its_params(tmp_path, shared_data):
    """Given two files and weights (as a run's written params give them), the run blends the two files'
    probabilities without checking again; the blend's probabilities are the weighted mean of each file's."""
    import dataclasses

    from core.engines import load_engine, make_predictor, run_predictor
    from core.modeling.blend import BlendedPredictor
    from core.params import ReferenceSpec, RunParams
    from core.raster import RasterSource
    from core.pipeline import run
    from shapely.geometry import shape

    shipped, objects = default_adapters("embedded"), objects_adapters("embedded")
    if shipped is None or objects is None:
        pytest.skip("the two adapters files are not shipped for the embedded model")
    tile = shared_data / "oam_buildings" / "images" / "area2_OAM-1238452-1046530-21.tif"
    labels = json.loads((shared_data / "oam_buildings" / "labels_geojson" / f"{tile.stem}.geojson").read_text())
    house = max((shape(f["geometry"]) for f in labels["features"]), key=lambda g: g.area)
    ref = ReferenceSpec(raster=str(tile), foreground=(house.wkt,), crs="EPSG:4326")
    params = RunParams(class_name="building", references=(ref,), targets=(str(tile),),
                       output=str(tmp_path / "blend.gpkg"), overwrite=True, mode="virefsam",
                       model=ModelParams(device="cpu", adapters=f"{shipped},{objects}", adapter_weights=(0.7, 0.3)))
    result = run(params)
    assert not [n for n in result.notes if n.startswith("Adapters auto:")]  # the weights were given: no check
    written = json.loads((tmp_path / "blend.gpkg.params.json").read_text())
    assert written["model"]["adapter_weights"] == [0.7, 0.3]

    engine = load_engine(params.model)
    blend = run_predictor(engine, params)
    assert isinstance(blend, BlendedPredictor) and blend.weights == pytest.approx([0.7, 0.3])
    with RasterSource(str(tile)) as src:
        rgb, _ = src.read_rgb8()
    shots = [(rgb, np.zeros(rgb.shape[:2], bool))]
    shots[0][1][rgb.shape[0] // 3: rgb.shape[0] // 2, rgb.shape[1] // 3: rgb.shape[1] // 2] = True
    blend.set_references(shots)
    a, b = make_predictor(engine, params, shipped), make_predictor(engine, params, objects)
    a.set_references(shots)
    b.set_references(shots)
    np.testing.assert_allclose(blend.predict(rgb), 0.7 * a.predict(rgb) + 0.3 * b.predict(rgb), atol=1e-5)
    one = run_predictor(engine, dataclasses.replace(params, model=dataclasses.replace(
        params.model, adapter_weights=(1.0, 0.0))))
    assert not isinstance(one, BlendedPredictor)  # a file of weight 0 costs nothing


def test_eval_weighs_two_files_per_episode(tiny_folder, tmp_path):
    """``eval --adapters A.pt,B.pt``: each episode's check on its reference weighs the files; the JSON gives the
    weights and checks of every episode and how often each file was used."""
    from core import cli

    shipped, objects = default_adapters("embedded"), objects_adapters("embedded")
    if shipped is None or objects is None:
        pytest.skip("the two adapters files are not shipped for the embedded model")
    report = tmp_path / "eval.json"
    argv = ["eval", "--data", str(tiny_folder), "--fold", "0", "--device", "cpu", "--feature-cache", str(tmp_path / "f"),
            "--quiet", "--shots", "1", "--episodes", "2", "--modes", "virefsam", "--adapters", f"{shipped},{objects}",
            "--json", str(report)]
    assert cli.main(argv) == 0
    rep = json.loads(report.read_text())
    assert [r["path"] for r in rep["adapters"]["weighed"]] == [str(shipped.resolve()), str(objects.resolve())]
    res = rep["results"]["1-shot"]["modes"]["virefsam"]
    assert res["blend"]["temperature"] > 0 and sum(res["used"].values()) >= 2
    for e in res["episodes"]:
        assert len(e["checks"]) == 2 and abs(sum(e["weights"]) - 1) < 1e-3
        assert e["weights"] == pytest.approx(blend_weights(e["checks"]), abs=2e-3)
        assert len(e["outside"]) == 2 and min(e["outside"]) >= 0 and 0 <= e["inter"] <= e["union"]
        assert "tuned_all" not in e  # --tune-files vcp_alone: nothing to decide
    # --tune-files auto with one file: the check runs per episode for the decision alone, which each row records
    assert cli.main(argv[:-4] + ["--adapters", str(shipped), "--tune-files", "auto", "--tune-steps", "1",
                                 "--json", str(report)]) == 0
    rows = json.loads(report.read_text())["results"]["1-shot"]["modes"]["virefsam"]["episodes"]
    assert all(isinstance(e["tuned_all"], bool) and e["weights"] == [1.0] for e in rows)
    assert all(e["tuned_all"] == (e["outside"][0] <= 1.0) for e in rows)


def test_adapter_weights_that_do_not_fit_the_files_end_in_one_sentence():
    from core.errors import InputError
    from core.params import ReferenceSpec, RunParams

    ref = ReferenceSpec(raster="a.tif", foreground=("POINT (0 0)",))
    for adapters, weights in (("a.pt", (0.5, 0.5)), ("a.pt,b.pt", (0.0, 0.0)), ("a.pt,b.pt", (1.2, -0.2))):
        with pytest.raises(InputError, match="^The adapter weights must be one non-negative number per adapters "
                                             "file, not all zero.$"):
            RunParams(class_name="x", references=(ref,), targets=("b.tif",), output="o.gpkg",
                      model=ModelParams(adapters=adapters, adapter_weights=weights))


def test_one_crop_is_also_checked_on_a_view_it_was_not_given(shared_data):
    """One reference crop has no other crop to be segmented from: the check is the mean of its IoU on the crop
    itself and on the crop mirrored and resized to 0.75x (core.choice.altered_view). Several crops: each from the
    others, as before. Real OAM tile, real predictor with the shipped adapters."""
    from shapely.geometry import shape

    from core.choice import ALTERED_SCALE, altered_view, reference_check
    from core.engines import load_engine, make_predictor
    from core.params import ReferenceSpec, RunParams
    from core.reference import reference_set

    shipped = default_adapters("embedded")
    if shipped is None:
        pytest.skip("no adapters are shipped for the embedded model")
    tile = shared_data / "oam_buildings" / "images" / "area2_OAM-1238452-1046530-21.tif"
    labels = json.loads((shared_data / "oam_buildings" / "labels_geojson" / f"{tile.stem}.geojson").read_text())
    houses = sorted((shape(f["geometry"]) for f in labels["features"]), key=lambda g: -g.area)[:2]
    params = RunParams(class_name="building", targets=(str(tile),), mode="virefsam",
                       references=(ReferenceSpec(raster=str(tile), foreground=tuple(h.wkt for h in houses),
                                                 crs="EPSG:4326"),),
                       model=ModelParams(device="cpu", adapters=str(shipped)))
    refs, _ = reference_set(params.references)
    assert len(refs) == 1  # two houses of one 256-px tile: one crop
    shot = (refs[0].image, refs[0].mask)
    view, marks = altered_view(*shot)
    h, w = shot[1].shape
    assert view.shape == (int(h * ALTERED_SCALE), int(w * ALTERED_SCALE), 3) and marks.shape == view.shape[:2]
    assert abs(marks.mean() - shot[1].mean()) < 0.02  # the same marks, mirrored and smaller
    pred = make_predictor(load_engine(params.model), params, shipped)
    pred.set_references([shot])
    own = touching_iou(pred.predict(shot[0]), shot[1].astype(bool))
    other = touching_iou(pred.predict(view), marks)
    want = (own[0] / own[1] + other[0] / other[1]) / 2
    assert reference_check(pred, [shot]) == pytest.approx(want, abs=1e-6)
    assert 0.3 < want <= 1.0  # the shipped buildings file finds the marked houses in both views


def test_a_reference_marking_every_house_of_its_crop_tunes_the_dta_file_too(tmp_path, shared_data):
    """tune_files "auto" with one file: the check runs for the decision alone. Every labelled house of a real
    OAM tile marked: little is found beyond the marks, so the DTA file is tuned (its own progress step) and the
    written parameters say "all", so that a replay tunes again without checking."""
    from shapely.geometry import shape

    from core.params import ReferenceSpec, RunParams
    from core.pipeline import run

    shipped = default_adapters("embedded")
    if shipped is None:
        pytest.skip("no adapters are shipped for the embedded model")
    tile = shared_data / "oam_buildings" / "images" / "area2_OAM-1238452-1046530-21.tif"
    labels = json.loads((shared_data / "oam_buildings" / "labels_geojson" / f"{tile.stem}.geojson").read_text())
    houses = tuple(shape(f["geometry"]).wkt for f in labels["features"])
    params = RunParams(class_name="building", targets=(str(tile),), output=str(tmp_path / "all.gpkg"),
                       references=(ReferenceSpec(raster=str(tile), foreground=houses, crs="EPSG:4326"),),
                       mode="virefsam", tune_steps=2, tune_files="auto",
                       model=ModelParams(device="cpu", adapters=str(shipped)))
    said = []
    result = run(params, progress=lambda f, m="": said.append(m))
    assert not [n for n in result.notes if n.startswith("Adapters auto:")]  # one file: nothing to weigh
    (tuning,) = [n for n in result.notes if n.startswith("Tuning every adapters file")]
    assert "look complete" in tuning, tuning
    assert "checking the reference" in said
    assert any(m.startswith("tuning on the references of building (2/2)") for m in said)
    written = json.loads((tmp_path / "all.gpkg.params.json").read_text())
    assert written["tune_files"] == "all" and written["model"]["adapters"] == str(shipped)
    assert sum(len(t.features) for t in result.targets) > 0


def test_the_tuning_rule_replay_gives_back_both_runs_at_its_extremes():
    """scripts/tuning_rule.py on the committed fold-0 runs (session 17): a limit below every episode's share is
    the ``vcp_alone`` run, an infinite one the ``all`` run, each as the eval command scored it."""
    import importlib.util
    from pathlib import Path

    here = Path(__file__).resolve().parent.parent
    spec = importlib.util.spec_from_file_location("tuning_rule", here / "scripts" / "tuning_rule.py")
    rule = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(rule)
    runs = here / "resources" / "adapters" / "folds" / "tune_rule"
    alone, every = (runs / "fold0.vcp_alone.1shot.eval.json", runs / "fold0.all.1shot.eval.json")
    a, b = rule.episodes(str(alone), "1-shot"), rule.episodes(str(every), "1-shot")
    for path, limit in ((alone, -1.0), (every, float("inf"))):
        miou, _, tuned = rule.replay(a, b, limit)
        scored = json.loads(path.read_text())["results"]["1-shot"]["modes"]["virefsam"]["miou"]
        assert miou == pytest.approx(scored, abs=0.01) and tuned == (0 if limit < 0 else len(a))
