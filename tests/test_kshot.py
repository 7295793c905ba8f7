"""The K-shot ensemble as the run's default (RunParams.kshot, issue #20 item 2).

Real embedded SAM, the real shipped adapters, real OpenAerialMap windows of ../shared/data: two reference crops
(K = 2) of the Kampala mosaic and a Zanzibar target window.
"""

import argparse
import json
import pickle
from pathlib import Path

import numpy as np
import pytest

from core.errors import InputError
from core.params import ModelParams, ReferenceSpec, RunParams

ADAPTERS = Path(__file__).resolve().parent.parent / "resources" / "adapters" / "embedded_virefsam.pt"


def _run_params(**kw):
    return RunParams(class_name="c", references=(ReferenceSpec(raster="r.tif", foreground=("POINT (0 0)",)),),
                     targets=("t.tif",), **kw)


def test_kshot_parameter_defaults_round_trips_and_old_files_load_as_joint():
    new = _run_params()
    assert new.kshot == "ensemble"  # new runs
    joint = _run_params(kshot="joint")
    assert RunParams.from_json(joint.to_json()) == joint and RunParams.from_json(new.to_json()) == new
    old = json.loads(new.to_json())
    del old["kshot"]  # a parameters file written before the field: it ran the joint decoding
    assert RunParams.from_json(json.dumps(old)).kshot == "joint"
    with pytest.raises(InputError, match="Unknown K-shot method 'mean': choose one of ensemble, joint"):
        _run_params(kshot="mean")


def test_segment_and_eval_options_default_to_the_ensemble():
    from core import segment_cli
    from core.training import evaluate

    demo = Path(__file__).resolve().parents[1] / "resources" / "demo"
    p = argparse.ArgumentParser()
    segment_cli.add_arguments(p)
    base = ["--reference", str(demo / "reference.tif"), "--reference-geometry", str(demo / "reference_houses.geojson"),
            "--targets", str(demo / "target_kampala.tif")]
    assert segment_cli.params_from_args(p.parse_args(base)).kshot == "ensemble"
    assert segment_cli.params_from_args(p.parse_args(base + ["--kshot", "joint"])).kshot == "joint"
    e = argparse.ArgumentParser()
    evaluate.add_arguments(e)
    assert e.get_default("kshot") == "ensemble"


def _read(path, window, bands):
    import rasterio
    from rasterio.windows import Window

    with rasterio.open(path) as src:
        return np.ascontiguousarray(src.read(bands, window=Window(*window)))


@pytest.fixture(scope="module")
def two_shots(shared_data):
    """K = 2 reference crops (image, houses mask) of the Kampala mosaic and a Zanzibar target window."""
    mos = shared_data / "oam_mosaics"
    shots = []
    for x, y in ((512, 512), (1024, 0)):
        img = _read(mos / "kampala.tif", (x, y, 512, 512), [1, 2, 3]).transpose(1, 2, 0).copy()
        shots.append((img, _read(mos / "kampala_buildings.tif", (x, y, 512, 512), 1) > 0))
    assert all(m.mean() > 0.02 for _, m in shots)
    tile = _read(mos / "zanzibar.tif", (1024, 1024, 1024, 1024), [1, 2, 3]).transpose(1, 2, 0).copy()
    return shots, tile


def test_make_predictor_uses_the_run_kshot(two_shots):
    from core.engines import load_engine, make_predictor

    shots, _ = two_shots
    eng = load_engine(ModelParams(device="cpu"))
    for kshot, n in (("ensemble", 2), ("joint", None)):
        pred = make_predictor(eng, _run_params(kshot=kshot), ADAPTERS)
        assert pred.kshot == kshot
        pred.set_references(shots)
        assert (None if pred._shots is None else len(pred._shots)) == n
    one = make_predictor(eng, _run_params(zoom_views=False), ADAPTERS)
    one.set_references(shots[:1])
    assert one._shots is None  # one shot without its zoomed views: nothing to ensemble
    one = make_predictor(eng, _run_params(), ADAPTERS)
    one.set_references(shots[:1])
    assert len(one._shots) == 3  # the reference and its two zoomed views (RunParams.zoom_views, the default)


def test_k2_reference_state_round_trips(two_shots):
    """What a Dask worker gets (the pickled reference state) predicts as the predictor that set the references:
    the per-shot prototypes of the ensemble travel with the joint ones."""
    from core.engines import load_engine
    from core.modeling.predictor import ReferencePredictor

    shots, tile = two_shots
    eng = load_engine(ModelParams(device="cpu"))
    pred = ReferencePredictor(eng, mode="virefsam", adapters=ADAPTERS)
    assert pred.kshot == "ensemble"
    pred.set_references(shots)
    state = pickle.loads(pickle.dumps(pred.reference_state(), protocol=5))
    assert len(state["shots"]) == 2 and all(isinstance(s["fg"], np.ndarray) for s in state["shots"])
    other = ReferencePredictor(eng, mode="virefsam", adapters=ADAPTERS)
    other.load_reference_state(state)
    want, got = pred.predict(tile), other.predict(tile)
    assert float(np.abs(want - got).max()) <= 1e-5
    assert (want > 0.5).mean() > 0.01
    # without the shots the worker would run the joint decoding: another result
    joint = ReferencePredictor(eng, mode="virefsam", adapters=ADAPTERS, kshot="joint")
    joint.load_reference_state({k: v for k, v in state.items() if k != "shots"})
    assert joint._shots is None and float(np.abs(joint.predict(tile) - want).max()) > 1e-3
