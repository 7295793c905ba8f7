"""Run-time tuning of VCP on the references (core.modeling.tune) with the real embedded SAM, the shipped adapters
and a real OpenAerialMap reference (Kampala houses) and target (Zanzibar)."""

from collections import OrderedDict
from pathlib import Path

import numpy as np
import pytest
import torch

from core.modeling.predictor import ReferencePredictor
from core.modeling.virefsam import ViRefSAM

ADAPTERS = Path(__file__).resolve().parent.parent / "resources" / "adapters" / "embedded_virefsam.pt"


def _read(path, window, bands):
    import rasterio
    from rasterio.windows import Window

    with rasterio.open(path) as src:
        return src.read(bands, window=Window(*window))


@pytest.fixture(scope="module")
def scene(shared_data):
    mos = shared_data / "oam_mosaics"
    ref = np.ascontiguousarray(_read(mos / "kampala.tif", (768, 768, 512, 512), [1, 2, 3]).transpose(1, 2, 0))
    ref_mask = _read(mos / "kampala_buildings.tif", (768, 768, 512, 512), 1) > 0
    tile = np.ascontiguousarray(_read(mos / "zanzibar.tif", (1024, 1024, 768, 768), [1, 2, 3]).transpose(1, 2, 0))
    return (ref, ref_mask), tile


def _vcp_state(model):
    return {k: v.detach().clone() for k, v in model.vcp.state_dict().items()}


def test_tuning_changes_a_copy_of_vcp_only(engine, scene):
    ref, tile = scene
    model = ViRefSAM.from_adapters(engine.sam, ADAPTERS)
    before = _vcp_state(model)
    plain = ReferencePredictor(engine, mode="virefsam", adapters=model, cache=OrderedDict())
    tuned = ReferencePredictor(engine, mode="virefsam", adapters=model, cache=OrderedDict(), tune_steps=3)
    plain.set_references([ref])
    tuned.set_references([ref])
    # the loaded model is untouched (other classes and runs share it); the tuned copy shares all but VCP
    assert all(torch.equal(before[k], v) for k, v in model.vcp.state_dict().items())
    assert tuned.model is not tuned._base_model and tuned._base_model is plain.model
    assert tuned.model.sam is model.sam and tuned.model.encoder is model.encoder
    assert tuned.model.vcp is not model.vcp and not tuned.model.training
    moved = max(float((tuned.model.vcp.state_dict()[k] - v).abs().max()) for k, v in before.items())
    assert moved > 0
    assert not any(p.requires_grad for p in tuned.model.vcp.parameters())
    a, b = plain.predict(tile), tuned.predict(tile)
    assert np.isfinite(b).all() and float(np.abs(a - b).max()) > 1e-4  # the tuning acts on the result
    ma, mb = a > 0.5, b > 0.5
    assert ma.mean() > 0.01 and (ma & mb).sum() / max((ma | mb).sum(), 1) > 0.5  # three small steps: near it
    # new references start again from the loaded model
    tuned.set_references([ref])
    assert tuned.model is not tuned._base_model and tuned._base_model is model


def test_tuning_is_for_the_trained_mode_only(engine, scene):
    ref, _ = scene
    pred = ReferencePredictor(engine, mode="training_free", tune_steps=3)
    pred.set_references([ref])
    assert pred.model is None


def test_tuned_reference_state_reaches_another_predictor(engine, scene):
    """A Dask worker gets the tuned VCP with the prototypes: the same probabilities as the tuning predictor."""
    import pickle

    ref, tile = scene
    pred = ReferencePredictor(engine, mode="virefsam", adapters=ADAPTERS, cache=OrderedDict(), tune_steps=2)
    pred.set_references([ref])
    state = pickle.loads(pickle.dumps(pred.reference_state(), protocol=5))
    assert "vcp" in state
    other = ReferencePredictor(engine, mode="virefsam", adapters=ADAPTERS, cache=OrderedDict(), tune_steps=2)
    other.load_reference_state(state)
    assert other.model is not other._base_model
    assert float(np.abs(pred.predict(tile) - other.predict(tile)).max()) < 1e-5


def test_tune_steps_run_parameter_and_pipeline_progress(tmp_path):
    import json

    from core.demo import TARGETS, demo_params
    from core.errors import InputError
    from core.params import RunParams
    from core.pipeline import run

    from core.params import DEFAULT_TUNE_STEPS

    params = demo_params(tmp_path)
    assert params.tune_steps == DEFAULT_TUNE_STEPS and params.tune_files == "vcp_alone"
    old = json.loads(params.to_json())
    del old["tune_steps"], old["tune_files"]  # a file from before the fields: no tuning (and "all" if it had)
    assert RunParams.from_json(json.dumps(old)).tune_steps == 0
    assert RunParams.from_json(json.dumps(old)).tune_files == "all"
    with pytest.raises(InputError, match="tuning steps"):
        params.__class__(**{**params.__dict__, "tune_steps": -1})
    with pytest.raises(InputError, match="files to tune"):
        params.__class__(**{**params.__dict__, "tune_files": "dta"})
    import dataclasses

    # the demo's reference keeps the DTA file alone: tuned only when every file is
    tuned = dataclasses.replace(params, tune_steps=2, tune_files="all", targets=(str(TARGETS["kampala"]),))
    assert RunParams.from_json(tuned.to_json()) == tuned
    said = []
    result = run(tuned, progress=lambda f, m="": said.append(m))
    assert any(m.startswith("tuning on the references of building (2/2)") for m in said)
    assert result.targets[0].n_objects > 0


def test_only_a_file_without_dta_is_tuned_by_default_and_never_in_the_check(engine, scene):
    """``tune_files="vcp_alone"`` (the default): the DTA file keeps its VCP, the objects file (VCP alone) is tuned
    on the references; the check on the reference (core.choice) runs every file as loaded, then the tuning steps
    are back. ``"all"``: the DTA file is tuned too."""
    from core.choice import reference_check
    from core.engines import objects_adapters

    ref, _ = scene
    objects = objects_adapters("embedded")
    if objects is None:
        pytest.skip("no objects file is shipped for the embedded model")
    dta = ReferencePredictor(engine, adapters=ADAPTERS, cache=OrderedDict(), tune_steps=2, tune_files="vcp_alone")
    assert dta.tune_steps == 0
    dta.set_references([ref])
    assert dta.model is dta._base_model
    assert ReferencePredictor(engine, adapters=ADAPTERS, cache=OrderedDict(), tune_steps=2,
                              tune_files="all").tune_steps == 2
    cache = OrderedDict()
    obj = ReferencePredictor(engine, adapters=objects, cache=cache, tune_steps=2, tune_files="vcp_alone")
    untuned = ReferencePredictor(engine, adapters=objects, cache=cache)
    assert obj.tune_steps == 2
    check = reference_check(obj, [ref])
    assert obj.tune_steps == 2 and obj.model is obj._base_model  # checked as loaded
    assert check == pytest.approx(reference_check(untuned, [ref]), abs=1e-6)
    obj.set_references([ref])
    assert obj.model is not obj._base_model  # then tuned for the run


def test_the_eval_ablation_row_is_tuned_exactly_when_the_adapters_file_is(engine):
    """``eval``'s ``vcp_no_dta`` row stands for the ``--adapters`` file without DTA: with the default
    ``--tune-files vcp_alone`` the DTA file is not tuned, so neither is its ablation; with ``all`` both are;
    an ``--adapters`` file without DTA (the objects file) is tuned, and its ablation with it."""
    import argparse

    from core.engines import objects_adapters
    from core.training.evaluate import _predictors

    def steps(adapters, files):
        args = argparse.Namespace(adapters=str(adapters), ablation_adapters=None, model="embedded", seed=0,
                                  bg="per_shot", modes="virefsam,vcp_no_dta", kshot="ensemble", tune_steps=5,
                                  tune_lr=1e-4, tune_ignore_found=True, tune_files=files, zoom_views=True)
        preds = _predictors(args, engine)
        return preds["virefsam"][0].tune_steps, preds["vcp_no_dta"][0].tune_steps, preds["vcp_no_dta"][1]

    main, ablation, note = steps(ADAPTERS, "vcp_alone")
    assert (main, ablation) == (0, 0) and note.endswith("not tuned, as --adapters is not")
    assert steps(ADAPTERS, "all")[:2] == (5, 5)
    objects = objects_adapters("embedded")
    if objects is not None:
        assert steps(objects, "vcp_alone")[:2] == (5, 5)
