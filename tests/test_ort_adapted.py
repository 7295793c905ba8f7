"""The adapted (DTA) encoder pass in ONNX Runtime (core.modeling.ort_adapted) against PyTorch fp32.

Real embedded SAM, the real shipped adapters (resources/adapters/embedded_virefsam.pt), real tiles of the
OpenAerialMap mosaics: a Kampala reference with its OSM buildings, Zanzibar targets. Exported graphs go to a
temporary VIREFSAM_HOME (set after the engines are built, which read the converted weights from the real cache).
"""

import os
from collections import OrderedDict
from pathlib import Path

import numpy as np
import pytest
import torch

from core.device import cpu_int8_is_exact
from core.modeling import ort_adapted
from core.modeling.dta import DTAContext
from core.modeling.engine import SamEngine
from core.modeling.predictor import ReferencePredictor
from core.modeling.virefsam import ViRefSAM

ADAPTERS = Path(__file__).resolve().parent.parent / "resources" / "adapters" / "embedded_virefsam.pt"


@pytest.fixture(scope="module")
def ort_engine(embedded_sam):
    """The adapted pass in ONNX Runtime as exported (fp32): compared with PyTorch tensor by tensor."""
    eng = SamEngine(embedded_sam, device="cpu", precision="fp32", encoder_backend="auto", adapted_precision="fp32")
    assert eng.encoder_backend == "onnxruntime"
    return eng


@pytest.fixture(scope="module")
def int8_engine(embedded_sam):
    """The default: the adapted pass's graph with int8 weights where the CPU's int8 products are exact (VNNI),
    else fp32; forced to int8 here so that the int8 graph's own tests run on every CPU."""
    eng = SamEngine(embedded_sam, device="cpu", precision="fp32", encoder_backend="auto")
    assert eng.encoder_backend == "onnxruntime" and eng.requested_adapted_precision == "int8"
    assert eng.adapted_precision == ("int8" if cpu_int8_is_exact() else "fp32")
    eng.adapted_precision = "int8"
    return eng


@pytest.fixture(scope="module")
def home(ort_engine, int8_engine, engine, tmp_path_factory):
    """A fresh model cache for the exports (after the engines have read the real one)."""
    old = os.environ.get("VIREFSAM_HOME")
    path = tmp_path_factory.mktemp("virefsam_home")
    os.environ["VIREFSAM_HOME"] = str(path)
    yield path
    if old is None:
        os.environ.pop("VIREFSAM_HOME", None)
    else:
        os.environ["VIREFSAM_HOME"] = old


class _Recorder:
    """Calls the real runner and keeps what it was given and returned."""

    def __init__(self, runner):
        self.runner, self.calls = runner, []

    def __call__(self, x, ctx, stem=None):
        out = self.runner(x, ctx, stem=stem)
        self.calls.append((x.clone(), ctx.table.clone(), ctx.assign.clone(), stem, out.clone()))
        return out


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    return float((a & b).sum() / max((a | b).sum(), 1))


def test_exported_graph_equals_pytorch_on_real_tiles(home, ort_engine, int8_engine, engine, kampala_episode):
    ref, tiles = kampala_episode
    fast = ReferencePredictor(ort_engine, mode="virefsam", adapters=ADAPTERS, cache=OrderedDict())
    slow = ReferencePredictor(engine, mode="virefsam", adapters=ADAPTERS, cache=OrderedDict())
    assert isinstance(fast.model.adapted_runner, ort_adapted.OrtAdaptedEncoder)
    assert fast.model.adapted_runner.exported and fast.model.adapted_runner.path.parent == home / "adapted"
    assert slow.model.adapted_runner is None  # encoder_backend 'torch': PyTorch everywhere
    rec = _Recorder(fast.model.adapted_runner)
    fast.model.adapted_runner = rec
    fast.set_references([ref])
    slow.set_references([ref])
    probs_fast = fast.predict_batch(tiles)
    probs_slow = slow.predict_batch(tiles)
    assert len(rec.calls) == len(tiles)
    for x, table, assign, stem, out in rec.calls:  # the graph against the module, same inputs
        assert stem is not None and stem.shape == (1, 128 * 128, 128)  # handed over by the plain pass
        assert assign.min() >= 0 and assign.max() <= table.shape[1]
        with torch.inference_mode():
            want = fast.model.encoder(x, DTAContext(table, assign))
        diff = float((out - want).abs().max())
        assert diff < 1e-4, diff  # measured ~5e-7 on embeddings of magnitude ~0.5
    for pf, ps in zip(probs_fast, probs_slow):  # the whole ORT path against the whole PyTorch fp32 path
        mf, ms = pf > 0.5, ps > 0.5
        assert ms.mean() > 0.01  # the masks are not trivially empty
        assert _iou(mf, ms) >= 0.99, _iou(mf, ms)


def test_changed_adapters_get_their_own_export(home, ort_engine, tmp_path):
    blob = torch.load(ADAPTERS, map_location="cpu", weights_only=True)
    name = sorted(blob["dta"])[0]
    blob["dta"][name] = blob["dta"][name] + 1e-3
    mine = tmp_path / "my_adapters.pt"
    torch.save(blob, mine)
    shipped = ViRefSAM.from_adapters(ort_engine.sam, ADAPTERS)
    changed = ViRefSAM.from_adapters(ort_engine.sam, mine)
    k0, k1 = ort_adapted.graph_key(shipped.encoder), ort_adapted.graph_key(changed.encoder)
    assert k0 != k1
    assert ort_adapted.graph_key(ViRefSAM.from_adapters(ort_engine.sam, ADAPTERS).encoder) == k0  # stable
    pred = ReferencePredictor(ort_engine, mode="virefsam", adapters=mine)
    runner = pred.model.adapted_runner
    assert runner.key == k1 and runner.exported
    assert runner.path != ort_adapted.graph_path(shipped.encoder, k0) and runner.path.is_file()
    # the same file again on the same engine (the dock's second run): the same model and session, nothing read
    again = ReferencePredictor(ort_engine, mode="virefsam", adapters=mine)
    assert again.model is pred.model and again.model.adapted_runner is runner
    torch.save(blob, mine)  # rewritten (a retrained file at the same path): read again
    os.utime(mine, ns=(mine.stat().st_atime_ns, mine.stat().st_mtime_ns + 10**9))
    assert ReferencePredictor(ort_engine, mode="virefsam", adapters=mine).model is not pred.model


def test_corrupt_cached_export_is_rebuilt(home, ort_engine, kampala_episode):
    model = ViRefSAM.from_adapters(ort_engine.sam, ADAPTERS).eval()
    first = ort_adapted.OrtAdaptedEncoder(model.encoder, threads=1, precision="fp32")  # exported earlier, or now
    path = first.path
    assert path.is_file() and not list(path.parent.glob("*.part"))
    with open(path, "r+b") as f:
        f.truncate(path.stat().st_size // 3)
    again = ort_adapted.OrtAdaptedEncoder(model.encoder, threads=1, precision="fp32")
    assert again.rebuilt and again.exported and again.path == path
    assert not list(path.parent.glob("*.part"))  # no temporary file left behind
    x, _ = ort_engine.preprocess(kampala_episode[1][0])
    table = torch.randn(1, 1 + model.n_bg, 256) * 0.1
    assign = torch.randint(0, 2 + model.n_bg, (1, 64, 64))
    ctx = DTAContext(table, assign)
    with torch.inference_mode():
        want = model.encoder(x, ctx)
    assert float((again(x, ctx) - want).abs().max()) < 1e-4  # stem computed by the runner's own stem graph


def test_int8_graph_keeps_the_masks_of_pytorch_fp32_on_real_tiles(home, int8_engine, engine, kampala_episode):
    """The default adapted pass (int8 weights) against the PyTorch fp32 path: the same masks (IoU >= 0.99 over
    the real tiles together, >= 0.97 on each: measured 0.997 and 0.988 here, 0.995-0.999 on four more tiles;
    boundary pixels near 0.5 flip), the embeddings within a few percent. On an x86 CPU without VNNI, where
    int8 products saturate and the default runs fp32 instead, the int8 graph is held to less (a CI machine:
    0.973 on one tile)."""
    ref, tiles = kampala_episode
    exact = cpu_int8_is_exact()
    cpu = f"int8 exact here: {exact}; {torch.backends.cpu.get_cpu_capability()}"  # said when a bound fails
    fast = ReferencePredictor(int8_engine, mode="virefsam", adapters=ADAPTERS, cache=OrderedDict())
    slow = ReferencePredictor(engine, mode="virefsam", adapters=ADAPTERS, cache=OrderedDict())
    runner = fast.model.adapted_runner
    assert runner.precision == "int8" and runner.run_path == ort_adapted.int8_path(runner.path)
    assert runner.run_path.is_file() and not list(runner.run_path.parent.glob("*.part*"))
    rec = _Recorder(runner)
    fast.model.adapted_runner = rec
    fast.set_references([ref])
    slow.set_references([ref])
    probs_fast, probs_slow = fast.predict_batch(tiles), slow.predict_batch(tiles)
    for x, table, assign, stem, out in rec.calls:
        with torch.inference_mode():
            want = fast.model.encoder(x, DTAContext(table, assign))
        rel = float((out - want).norm() / want.norm())
        assert rel < 0.05, rel  # measured ~0.012
    inter = union = 0
    for pf, ps in zip(probs_fast, probs_slow):
        mf, ms = pf > 0.5, ps > 0.5
        assert ms.mean() > 0.01
        assert _iou(mf, ms) >= (0.97 if exact else 0.95), (_iou(mf, ms), cpu)
        inter, union = inter + (mf & ms).sum(), union + (mf | ms).sum()
    assert inter / union >= (0.99 if exact else 0.96), (inter / union, cpu)


def test_corrupt_cached_int8_graph_is_rebuilt(home, int8_engine, kampala_episode):
    model = ViRefSAM.from_adapters(int8_engine.sam, ADAPTERS).eval()
    first = ort_adapted.OrtAdaptedEncoder(model.encoder, threads=1)  # int8 by default
    path = first.run_path
    assert path == ort_adapted.int8_path(first.path) and path.is_file()
    with open(path, "r+b") as f:
        f.truncate(path.stat().st_size // 3)
    again = ort_adapted.OrtAdaptedEncoder(model.encoder, threads=1)
    assert again.rebuilt and again.run_path == path and path.is_file()
    assert not list(path.parent.glob("*.part*"))
    x, _ = int8_engine.preprocess(kampala_episode[1][0])
    ctx = DTAContext(torch.randn(1, 1 + model.n_bg, 256) * 0.1, torch.randint(0, 2 + model.n_bg, (1, 64, 64)))
    with torch.inference_mode():
        want = model.encoder(x, ctx)
    assert float((again(x, ctx) - want).norm() / want.norm()) < 0.05


def test_unknown_adapted_precision_is_one_sentence(int8_engine):
    from core.errors import ModelError

    model = ViRefSAM.from_adapters(int8_engine.sam, ADAPTERS).eval()
    with pytest.raises(ModelError, match="Unknown adapted-pass precision 'int4'"):
        ort_adapted.OrtAdaptedEncoder(model.encoder, precision="int4")


def test_second_run_reuses_the_plain_pass_of_the_default_path(embedded_sam, kampala_episode):
    """The default path (plain and adapted passes in ONNX Runtime, the stem shared) keeps its plain passes in the
    engine's cache too: a second run on the same engine (a new predictor, as the dock's next run makes) encodes
    neither the reference crops nor the targets again, its adapted pass makes its own stem, and the
    probabilities equal the first run's within 1e-4."""
    eng = SamEngine(embedded_sam, device="cpu", precision="fp32", encoder_backend="auto")
    ref, tiles = kampala_episode
    first = ReferencePredictor(eng, mode="virefsam", adapters=ADAPTERS)
    first.set_references([ref])
    cold = first.predict_batch(tiles)
    kept = len(eng.embeddings)
    assert kept == 3 + len(tiles)  # the reference, its two zoomed views and the targets
    calls = []
    real = eng.encode_with_stem
    eng.encode_with_stem = lambda x: calls.append(x.shape) or real(x)
    try:
        second = ReferencePredictor(eng, mode="virefsam", adapters=ADAPTERS)
        second.set_references([ref])
        warm = second.predict_batch(tiles)
    finally:
        del eng.encode_with_stem
    assert calls == []  # no plain pass
    for a, b in zip(cold, warm):
        assert float(np.abs(a - b).max()) < 1e-4
