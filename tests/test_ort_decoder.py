"""SAM's mask decoder as ViRefSAM calls it, in ONNX Runtime (core.modeling.ort_decoder), against PyTorch.

Real embedded SAM, the real shipped adapters, real tiles: the Kampala reference with its OSM buildings and two
Zanzibar targets of the OpenAerialMap mosaics (as tests/test_ort_adapted.py). Exported graphs go to a temporary
VIREFSAM_HOME for the cache tests.
"""

import os
from pathlib import Path

import numpy as np
import pytest
import torch

from core.modeling import ort_decoder
from core.modeling.predictor import ReferencePredictor

ADAPTERS = Path(__file__).resolve().parent.parent / "resources" / "adapters" / "embedded_virefsam.pt"


@pytest.fixture(scope="module")
def ort_engine(embedded_sam):
    """The engine as the pipeline builds it on a CPU: the plain pass (and so the decoder) in ONNX Runtime."""
    from core.modeling.engine import SamEngine

    eng = SamEngine(embedded_sam, device="cpu", precision="fp32", encoder_backend="auto")
    assert eng.encoder_backend == "onnxruntime"
    return eng


@pytest.fixture
def home(ort_engine, tmp_path, monkeypatch):
    """A fresh model cache for the exports (after the session engine has read the real one)."""
    monkeypatch.setenv("VIREFSAM_HOME", str(tmp_path))
    return tmp_path


def test_predictor_decodes_in_ort_with_the_same_masks(ort_engine, engine, kampala_episode):
    """The default predictor (ORT plain pass) decodes through the ORT graph: on real tiles, with the real shipped
    adapters and the K-shot ensemble's four prompt sets (joint, reference, two zoomed views), its probabilities
    equal those of SAM's PyTorch decoder within 1e-4 and the masks are the same."""
    assert ReferencePredictor(engine, mode="virefsam", adapters=ADAPTERS).model.decoder_runner is None  # torch
    pred = ReferencePredictor(ort_engine, mode="virefsam", adapters=ADAPTERS)
    runner = pred.model.decoder_runner
    assert isinstance(runner, ort_decoder.OrtMaskDecoder)
    ref, tiles = kampala_episode
    pred.set_references([ref])
    calls = []
    real = runner.__call__

    class Counting:
        def __call__(self, *a):
            calls.append(a[1].shape)
            return real(*a)

    for tile in tiles:
        pred.model.decoder_runner = Counting()
        fast = pred.predict(tile)
        pred.model.decoder_runner = None  # SAM's decoder module in PyTorch
        exact = pred.predict(tile)
        pred.model.decoder_runner = runner
        assert float(np.abs(fast - exact).max()) < 1e-4
        a, b = fast > 0.5, exact > 0.5
        assert b.sum() > 1000  # houses found on the tile
        assert (a & b).sum() / (a | b).sum() > 0.999
    # one call per tile, all in ORT: the four prompt sets (joint, reference, two zoomed views) together
    assert len(calls) == 2
    assert all(s == (4, 2 + 2 + 64, 256) for s in calls)  # point pair, box corners, N_q = 64 queries


def test_gradients_still_go_through_pytorch(ort_engine, kampala_episode):
    """Training and run-time tuning need gradients of the decoder's inputs: with grad enabled ``_decode`` runs
    SAM's module (the ORT runner never sees the call)."""
    engine = ort_engine
    model = ReferencePredictor(engine, mode="virefsam", adapters=ADAPTERS).model
    seen, runner = [], model.decoder_runner
    model.decoder_runner = lambda *a: seen.append(1)  # would fail the unpacking if it were called
    ref, tiles = kampala_episode
    x, _ = engine.preprocess(tiles[0])
    plain = engine.encode(x)
    protos = model.reference_prototypes(*_ref_tensors(engine, ref))
    try:
        with torch.enable_grad():
            out = model(x, protos, plain=plain)
            out["low_res_logits"].float().mean().backward()
            grads = any(p.grad is not None for p in model.vcp.parameters())
    finally:
        model.decoder_runner = runner  # the engine keeps the model for later predictors
        model.zero_grad(set_to_none=True)
    assert not seen
    assert grads


def _ref_tensors(engine, ref):
    """The reference's plain embedding 1 x 256 x 64 x 64 and its mask 1 x 1024 x 1024 in the input frame."""
    image, mask = ref
    x, _ = engine.preprocess(image)
    emb = engine.encode(x)
    m = torch.zeros(1, 1024, 1024)
    m[0, : mask.shape[0], : mask.shape[1]] = torch.from_numpy(mask.astype(np.float32))
    return emb, m


def test_cache_key_follows_the_weights_and_a_damaged_graph_is_rebuilt(embedded_sam, home):
    """The graph is keyed by the decoder's weights (a changed tensor: another file); a truncated cached graph
    is exported again; the rebuilt graph decodes as PyTorch does."""
    first = ort_decoder.OrtMaskDecoder(embedded_sam, threads=1)
    assert first.exported and first.path.parent == home / "decoder" and first.path.is_file()
    again = ort_decoder.OrtMaskDecoder(embedded_sam, threads=1)
    assert not again.exported and again.path == first.path

    sd = {k: v.clone() for k, v in embedded_sam.mask_decoder.state_dict().items()}
    try:
        with torch.no_grad():
            embedded_sam.mask_decoder.iou_token.weight.add_(1e-3)
        assert ort_decoder.graph_key(embedded_sam) != first.key
    finally:
        embedded_sam.mask_decoder.load_state_dict(sd)
    assert ort_decoder.graph_key(embedded_sam) == first.key

    first.path.write_bytes(first.path.read_bytes()[:1000])  # a half-copied file
    fixed = ort_decoder.OrtMaskDecoder(embedded_sam, threads=1)
    assert fixed.rebuilt and fixed.path == first.path
    torch.manual_seed(0)
    emb, dense = torch.randn(2, 256, 64, 64) * 0.3, torch.randn(2, 256, 64, 64) * 0.1
    sparse = torch.randn(2, 68, 256) * 0.3
    low, iou = fixed(emb, sparse, dense)
    from core.modeling.virefsam import decode_per_image

    with torch.no_grad():
        want, want_iou = decode_per_image(embedded_sam, emb, sparse, dense)
    assert low.shape == want.shape == (2, 1, 256, 256) and iou.shape == want_iou.shape == (2, 1)
    assert float((low - want).abs().max()) < 1e-3
    assert not os.listdir(home / "decoder") or all(not n.endswith(".part") for n in os.listdir(home / "decoder"))
