"""Specks: polygons far smaller than the smallest marked object are dropped (``RunParams.min_object_share``).

Real rasters (the demo's four-house reference, a window of the shared Kampala orthophoto), the real embedded SAM
with the shipped adapters, real runs of the pipeline.
"""

import dataclasses
import json

import numpy as np
import pytest

from core import corrections
from core.errors import InputError
from core.params import RunParams
from core.scale import smallest_object_area


def test_smallest_object_area_is_over_all_masks():
    a = np.zeros((20, 20), bool)
    a[:4, :4] = True  # 16 px
    a[10:, 10:] = True  # 100 px
    b = np.zeros((8, 8), bool)
    b[0, 0] = b[0, 1] = b[1, 0] = True  # 3 px, 8-connected
    assert smallest_object_area([a]) == pytest.approx(16.0)
    assert smallest_object_area([a, b, np.zeros((4, 4), bool)]) == pytest.approx(3.0)
    assert smallest_object_area([np.zeros((4, 4), bool)]) == 0.0


def test_the_parameter_round_trips_old_files_keep_every_polygon_and_a_bad_value_is_one_sentence(tmp_path):
    params = corrections.scene_params("kampala", "t.tif")
    assert params.min_object_share == 0.05
    old = json.loads(params.to_json())
    del old["min_object_share"]  # a parameters file from before the field
    assert RunParams.from_json(json.dumps(old)).min_object_share == 0.0
    other = dataclasses.replace(params, min_object_share=0.2)
    assert RunParams.from_json(other.to_json()) == other
    for bad in (-0.1, 1.0, "a", True):
        with pytest.raises(InputError, match="share of the smallest marked one must be a number from 0"):
            dataclasses.replace(params, min_object_share=bad)
    from core.cli import build_parser

    args = build_parser().parse_args(["segment", "--reference", "r.tif", "--reference-geometry", "g.geojson",
                                      "--target", "t.tif", "--min-object-share", "0"])
    assert args.min_object_share == 0.0


def test_specks_go_and_the_houses_stay(tmp_path, shared_data):
    """On the Kampala window the default run drops the specks (polygons of a few pixels; the smallest marked
    house is 17 m2, so under 0.9 m2): fewer polygons, none under the floor, the same pixel scores within 0.005."""
    from core.pipeline import run

    target, truth = corrections.scene_window("kampala", shared_data / "oam_mosaics", tmp_path)
    params = corrections.scene_params("kampala", target, device="cpu")
    mask, transform, _ = corrections._truth(truth)
    kept, every = run(params), run(dataclasses.replace(params, min_object_share=0.0))
    a = [f.geometry for f in kept.targets[0].features]
    b = [f.geometry for f in every.targets[0].features]
    assert 0 < len(a) < len(b)
    assert min(g.area for g in a) >= 0.05 * 17.0  # m2: 5% of the smallest marked house, about 17.4 m2
    assert any(g.area < 0.5 for g in b)  # the specks were there
    sa, sb = corrections.score(a, mask, transform), corrections.score(b, mask, transform)
    assert abs(sa["iou"] - sb["iou"]) < 0.005
