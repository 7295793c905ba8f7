"""``adapters="auto"``: the check on the reference that picks one of the shipped adapters files (core.choice).

The real embedded SAM, the two real shipped files, the demo's real reference and a real target; the eval command
on a tiny synthetic dataset choosing between the two files per episode.
"""

import json

import numpy as np
import pytest

from core.choice import MARGIN, pick, touching_iou
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


def test_the_default_file_keeps_the_run_unless_another_checks_clearly_better():
    assert pick([0.50, 0.50 + MARGIN]) == 0  # not more than the margin above: the default file
    assert pick([0.50, 0.51 + MARGIN]) == 1
    assert pick([0.70, 0.20]) == 0 and pick([0.0, 0.0]) == 0


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


def test_a_run_with_auto_says_which_file_it_chose_and_records_it(tmp_path):
    """The demo's four marked houses choose the buildings file; the note says so with both checks, and the
    parameters written beside the output name the chosen file, so the run replays without choosing again."""
    import dataclasses

    from core.demo import TARGETS, demo_params
    from core.pipeline import run

    if objects_adapters("embedded") is None:
        pytest.skip("no second adapters file is shipped")
    params = dataclasses.replace(demo_params(tmp_path, device="cpu", adapters="auto"),
                                 targets=(str(TARGETS["kampala"]),))
    result = run(params)
    (note,) = [n for n in result.notes if n.startswith("Adapters auto:")]
    assert "embedded_virefsam.pt chosen" in note and "embedded_virefsam_objects.pt" in note
    written = json.loads((tmp_path / "demo.gpkg.params.json").read_text())
    assert written["model"]["adapters"] == str(default_adapters("embedded"))
    assert sum(len(t.features) for t in result.targets) > 0


def test_eval_chooses_per_episode_between_two_files(tiny_folder, tmp_path):
    """``eval --adapters A.pt,B.pt``: each episode's check on its reference picks a file; the JSON says which
    for every episode and how often each was chosen."""
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
    assert [r["path"] for r in rep["adapters"]["choose_from"]] == [str(shipped.resolve()), str(objects.resolve())]
    res = rep["results"]["1-shot"]["modes"]["virefsam"]
    assert sum(res["chosen"].values()) == 2
    assert all(e["chosen"] in (0, 1) and len(e["checks"]) == 2 for e in res["episodes"])

