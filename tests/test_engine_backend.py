"""The engine's encoder backend (ModelParams.encoder_backend): ONNX Runtime for the plain encoder passes of the
embedded model on the CPU, PyTorch otherwise; same results within the stated tolerances, on real data.

Tolerances (measured when written, 2-core CPU): embedding max abs difference ORT vs PyTorch 4e-7 (asserted
< 1e-4 of the embedding's magnitude); training-free probabilities on a real tile max abs difference < 1e-3 and
masks IoU > 0.999 (measured identical masks); pipeline polygon counts within 2 (measured equal).

No timing is asserted: speed lives in the bench report.
"""

import argparse
import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from core.errors import InputError, ModelError
from core.params import ModelParams, ReferenceSpec, RunParams

ROOT = Path(__file__).resolve().parent.parent
DEMO = ROOT / "resources" / "demo"


def _ort_or_skip():
    from core.modeling import ort_encoder

    if not ort_encoder.available():
        pytest.skip("onnxruntime or the encoder graph (python -m core setup-model) is not there")
    return ort_encoder


@pytest.fixture(scope="module")
def ort_engine(embedded_sam):
    _ort_or_skip()
    from core.modeling.engine import SamEngine

    return SamEngine(embedded_sam, device="cpu", precision="fp32", encoder_backend="onnxruntime")


def _iou(a, b):
    return float((a & b).sum()) / max(1, int((a | b).sum()))


# -- same results ------------------------------------------------------------------------------------------------
def test_ort_backend_embedding_matches_torch_on_a_real_tile(engine, ort_engine, zanzibar_embedding):
    assert engine.encoder_backend == "torch" and ort_engine.encoder_backend == "onnxruntime"
    x, _, want = zanzibar_embedding
    got = ort_engine.encode(x)
    assert got.shape == want.shape == (1, 256, 64, 64) and got.dtype == torch.float32
    assert float((got - want).abs().max()) < 1e-4 * max(1.0, float(want.abs().max()))


def test_ort_backend_masks_match_torch(engine, ort_engine, zanzibar_tile):
    """Training-free prediction (reference encode + target encode through the backend) and a point prompt."""
    from core.modeling.predictor import ReferencePredictor
    from core.raster import RasterSource

    image, labels = zanzibar_tile
    with RasterSource(str(DEMO / "target_zanzibar.tif")) as src:
        rgb, _ = src.read_rgb8()
    target = np.ascontiguousarray(rgb[:1024, :1024])
    probs = {}
    for name, eng in (("torch", engine), ("onnxruntime", ort_engine)):
        pred = ReferencePredictor(eng, mode="training_free")
        pred.set_references([(image, labels > 0)])
        probs[name] = pred.predict(target)
    a, b = probs["torch"], probs["onnxruntime"]
    assert (a >= 0.5).any()  # houses found: the comparison means something
    assert float(np.abs(a - b).max()) < 1e-3
    assert _iou(a >= 0.5, b >= 0.5) > 0.999

    # SAM prompted with a point (the densifier's path: engine.embed -> encode)
    pt = np.array([[512.0, 384.0]])
    m_t, iou_t, _ = engine.predict(image, points=pt, labels=[1], multimask=True)
    m_o, iou_o, _ = ort_engine.predict(image, points=pt, labels=[1], multimask=True)
    assert np.allclose(iou_t, iou_o, atol=1e-3)
    for k in range(3):
        assert _iou(m_t[k], m_o[k]) > 0.999


# -- which backend runs --------------------------------------------------------------------------------------
def test_auto_picks_ort_on_cpu_and_torch_when_forced(embedded_sam):
    from core.device import cpu_supports_bf16
    from core.modeling import ort_encoder
    from core.modeling.engine import SamEngine
    from core.pipeline import load_engine

    auto = load_engine(ModelParams(device="cpu"))
    assert auto.encoder_backend == ("onnxruntime" if ort_encoder.available() else "torch")
    assert load_engine(ModelParams(device="cpu")) is auto  # cached
    forced = load_engine(ModelParams(device="cpu", encoder_backend="torch"))
    assert forced is not auto and forced.encoder_backend == "torch"  # the backend is part of the cache key

    assert SamEngine(embedded_sam, device="cpu").encoder_backend == "torch"  # the engine's own default
    if cpu_supports_bf16():
        assert SamEngine(embedded_sam, device="cpu", precision="bf16", encoder_backend="auto").encoder_backend == "torch"
    with pytest.raises(ModelError):
        SamEngine(embedded_sam, device="cpu", encoder_backend="tensorrt")
    if ort_encoder.available():
        # another model's weights: auto falls back to torch, onnxruntime is refused
        from core.modeling.registry import build_architecture, freeze

        torch.manual_seed(0)
        other = freeze(build_architecture("vit_t"))
        assert SamEngine(other, device="cpu", encoder_backend="auto").encoder_backend == "torch"
        with pytest.raises(ModelError, match="embedded model only"):
            SamEngine(other, device="cpu", encoder_backend="onnxruntime")
        if cpu_supports_bf16():
            with pytest.raises(ModelError, match="CPU in fp32"):
                SamEngine(embedded_sam, device="cpu", precision="bf16", encoder_backend="onnxruntime")


def test_ort_threads_follow_params_and_do_not_spin(embedded_sam):
    _ort_or_skip()
    from core.modeling.engine import SamEngine

    eng = SamEngine(embedded_sam, device="cpu", threads=1, encoder_backend="onnxruntime")
    so = eng._ort.session.get_session_options()
    assert so.intra_op_num_threads == 1
    assert so.get_session_config_entry("session.intra_op.allow_spinning") == "0"
    default = SamEngine(embedded_sam, device="cpu", threads=0, encoder_backend="onnxruntime")
    assert default._ort.session.get_session_options().intra_op_num_threads == 0  # ORT's default


# -- parameters ----------------------------------------------------------------------------------------------
def _run_params(**model):
    return RunParams(
        class_name="building",
        references=(ReferenceSpec(raster="r.tif", foreground=("POINT (0 0)",)),),
        targets=("t.tif",),
        model=ModelParams(device="cpu", **model),
    )


def test_params_json_round_trip_and_old_json():
    for backend in ("auto", "torch", "onnxruntime"):
        p = _run_params(encoder_backend=backend)
        assert RunParams.from_json(p.to_json()) == p
    assert ModelParams().encoder_backend == "auto"
    old = json.loads(_run_params().to_json())
    del old["model"]["encoder_backend"]  # written before the field existed
    assert RunParams.from_json(json.dumps(old)).model.encoder_backend == "auto"

    with pytest.raises(InputError, match="encoder backend"):
        _run_params(encoder_backend="tensorrt")
    with pytest.raises(InputError, match="embedded model only"):
        _run_params(name="vit_b", encoder_backend="onnxruntime")
    with pytest.raises(InputError, match="CPU in fp32"):
        _run_params(precision="bf16", encoder_backend="onnxruntime")


def test_adapted_precision_param_json_and_old_json():
    for prec in ("int8", "fp32"):
        p = _run_params(adapted_precision=prec)
        assert RunParams.from_json(p.to_json()) == p
    assert ModelParams().adapted_precision == "int8"  # new runs: the int8 adapted pass
    old = json.loads(_run_params().to_json())
    del old["model"]["adapted_precision"]  # written before the field existed: it ran the fp32 graph
    assert RunParams.from_json(json.dumps(old)).model.adapted_precision == "fp32"
    with pytest.raises(InputError, match="Unknown adapted-pass precision 'int4'"):
        _run_params(adapted_precision="int4")


def test_cli_encoder_backend_option():
    from core import segment_cli

    p = argparse.ArgumentParser()
    segment_cli.add_arguments(p)
    base = ["--reference", str(DEMO / "reference.tif"), "--reference-geometry", str(DEMO / "reference_houses.geojson"),
            "--targets", str(DEMO / "target_kampala.tif")]
    assert segment_cli.params_from_args(p.parse_args(base)).model.encoder_backend == "auto"
    args = p.parse_args(base + ["--encoder-backend", "torch"])
    assert segment_cli.params_from_args(args).model.encoder_backend == "torch"
    with pytest.raises(SystemExit):
        p.parse_args(base + ["--encoder-backend", "tensorrt"])


# -- the pipeline --------------------------------------------------------------------------------------------
def test_pipeline_with_ort_gives_the_same_polygons(tmp_path):
    _ort_or_skip()
    from core.pipeline import load_engine, run
    from core.segment_cli import read_geometries

    fg, bg, crs = read_geometries(str(DEMO / "reference_houses.geojson"))
    base = RunParams(
        class_name="building",
        references=(ReferenceSpec(raster=str(DEMO / "reference.tif"), foreground=fg, background=bg, crs=crs),),
        targets=(str(DEMO / "target_kampala.tif"),),
        mode="training_free",
        model=ModelParams(device="cpu", adapters=None, encoder_backend="torch"),
    )
    out = {}
    for backend in ("torch", "onnxruntime"):
        params = dataclasses.replace(base, model=dataclasses.replace(base.model, encoder_backend=backend))
        assert load_engine(params.model).encoder_backend == backend
        res = run(params)
        feats = res.targets[0].features
        out[backend] = (len(feats), sum(f.geometry.area for f in feats))
    (n_t, area_t), (n_o, area_o) = out["torch"], out["onnxruntime"]
    assert n_t >= 3  # houses in Kampala: the comparison means something
    assert abs(n_t - n_o) <= 2, out
    assert abs(area_t - area_o) <= 0.01 * area_t, out


def test_int8_adapted_pass_only_where_int8_products_are_exact(embedded_sam, monkeypatch):
    """int8 is asked by default; an x86 CPU without VNNI (its int8 products saturate) runs the fp32 graph. The
    CPU cannot be swapped in a test: the rule's answer is set both ways and the engine's choice read."""
    from core.modeling import engine as engine_module
    from core.modeling.engine import SamEngine

    assert isinstance(engine_module.cpu_int8_is_exact(), bool)
    for exact, want in ((True, "int8"), (False, "fp32")):
        monkeypatch.setattr(engine_module, "cpu_int8_is_exact", lambda e=exact: e)
        eng = SamEngine(embedded_sam, device="cpu", precision="fp32", encoder_backend="auto")
        assert eng.requested_adapted_precision == "int8" and eng.adapted_precision == want
        eng = SamEngine(embedded_sam, device="cpu", precision="fp32", encoder_backend="auto", adapted_precision="fp32")
        assert eng.adapted_precision == "fp32"
