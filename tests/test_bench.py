"""The benchmark (``python -m core bench``) and the optional ONNX Runtime encoder backend.

No timing is asserted anywhere: speed goals live in the bench report (docs/BENCH.md), never in a timed test.
"""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
DEMO = ROOT / "resources" / "demo"


def _demo_tile():
    from core.raster import RasterSource

    with RasterSource(str(DEMO / "target_kampala.tif")) as src:
        rgb, _ = src.read_rgb8()
    return rgb


# -- ONNX Runtime encoder --------------------------------------------------------------------------------------
def _ort_or_skip():
    from core.modeling import ort_encoder

    if not ort_encoder.available():
        pytest.skip("onnxruntime or the encoder graph (python -m core setup-model) is not there")
    return ort_encoder


def test_ort_encoder_matches_pytorch_on_a_real_tile(engine):
    ort_encoder = _ort_or_skip()
    x, _ = engine.preprocess(_demo_tile())
    want = engine.encode(x)
    got = ort_encoder.OrtImageEncoder(threads=1)(x)
    assert got.shape == want.shape == (1, 256, 64, 64)
    assert got.dtype == torch.float32
    assert float((got - want).abs().max()) < 1e-4 * max(1.0, float(want.abs().max()))


def test_use_onnxruntime_routes_encode_and_undoes(engine):
    ort_encoder = _ort_or_skip()
    from core.modeling.engine import SamEngine

    x, _ = engine.preprocess(_demo_tile())
    want = engine.encode(x)
    undo = ort_encoder.use_onnxruntime(engine, threads=1)
    try:
        assert "encode" in engine.__dict__
        got = engine.encode(torch.cat([x, x]))  # a batch goes through one image at a time
        assert got.shape == (2, 256, 64, 64)
        assert float((got[1:] - want).abs().max()) < 1e-4
    finally:
        undo()
    assert "encode" not in engine.__dict__

    # refusals: another model's weights, another precision
    from core.errors import ModelError
    from core.modeling.registry import build_architecture, freeze

    torch.manual_seed(0)
    other = SamEngine(freeze(build_architecture("vit_t")), device="cpu", precision="fp32")
    with pytest.raises(ModelError):
        ort_encoder.use_onnxruntime(other)
    from core.device import cpu_supports_bf16

    if cpu_supports_bf16():
        with pytest.raises(ModelError):
            ort_encoder.use_onnxruntime(SamEngine(engine.sam, device="cpu", precision="bf16"))


def test_mosaic_vrt_repeats_real_imagery(tmp_path):
    import rasterio

    from core.bench import mosaic_vrt

    src = DEMO / "target_kampala.tif"  # 1024 x 1024
    path = mosaic_vrt(str(src), 2500, str(tmp_path / "m.vrt"))
    with rasterio.open(src) as a, rasterio.open(path) as b:
        assert (b.width, b.height, b.count) == (2500, 2500, 3)
        assert b.crs == a.crs and b.transform.a == a.transform.a and b.transform.c == a.transform.c
        block = a.read(window=((0, 100), (0, 100)))
        assert np.array_equal(b.read(window=((1024, 1124), (2048, 2148))), block)  # tile (1, 2) is a copy
    crop = mosaic_vrt(str(src), 256, str(tmp_path / "c.vrt"), offset=(100, 200))
    with rasterio.open(src) as a, rasterio.open(crop) as b:
        assert (b.width, b.height) == (256, 256)
        assert np.array_equal(b.read(), a.read(window=((200, 456), (100, 356))))
        assert b.transform.c == pytest.approx(a.transform.c + 100 * a.transform.a)


# -- the quick bench -------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def quick_report(tmp_path_factory, shared_data):
    out = tmp_path_factory.mktemp("bench")
    target = shared_data / "oam_mosaics" / "zanzibar.tif"
    proc = subprocess.run(
        [sys.executable, "-m", "core", "bench", "--quick", "--out", str(out), "--target", str(target)],
        cwd=str(ROOT), capture_output=True, text=True, timeout=850,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    report = json.loads((out / "bench.json").read_text())
    return report, (out / "bench.md").read_text()


def test_quick_bench_report_has_every_section(quick_report):
    r, md = quick_report
    assert r["quick"] is True and r["schema"] == 1
    for key in ("machine", "roofline", "encoder", "speed_steps", "e2e", "latency", "multi", "memory", "cluster",
                "notes", "seconds"):
        assert key in r, key
    m = r["machine"]
    assert m["cores"] >= 1 and m["torch_threads"] >= 1 and isinstance(m["bf16"], bool)
    for heading in ("## Roofline", "## Image encoder", "## End to end", "## Several targets", "## Memory",
                    "## The same run on a local Dask cluster", "## Model load and first-tile latency"):
        assert heading in md
    # latency in a fresh process: the int8 graph made cold, and a second run that loads nothing again
    lat = r["latency"]["seconds"]
    assert lat["adapted graph int8 quantisation (cold)"] > 0 and lat["first tile"] > 0
    assert lat["engine (second run)"] < 0.5 and lat["predictor, second run"] < 0.5
    assert lat["references, second run (plain passes kept)"] > 0 and lat["first tile, second run (plain pass kept)"] > 0
    # the cluster row: the same objects as in-process, what travels per tile, the overhead per tile
    local, cluster = r["cluster"]
    assert cluster["run"] == "local:2" and cluster["objects"] == local["objects"]
    assert cluster["bytes_sent_per_tile"] > 0 and cluster["bytes_received_per_tile"] > 0
    assert "overhead_per_tile_s" in cluster


def test_quick_bench_values_are_sane(quick_report):
    r, _ = quick_report
    threads = str(r["machine"]["torch_threads"])
    assert r["roofline"]["fp32"][threads] > 0.5  # GFLOP/s
    if r["machine"]["bf16"]:
        assert r["roofline"]["bf16"][threads] > 0.5

    emb = r["encoder"]["embedded"]
    assert 60 < emb["gflop"] < 100  # TinyViT-5M at 1024^2: 77.5 GFLOP
    base = emb["variants"]["torch_fp32"]
    assert base["seconds"] > 0 and base["gflops"] > 0 and 0 < base["roofline_ratio"] < 1.5
    if "onnxruntime" in emb["variants"]:
        assert emb["variants"]["onnxruntime"]["max_abs_diff_vs_fp32"] < 1e-3
        assert emb["masks"]["by_backend"]["onnxruntime"]["iou_vs_fp32"] > 0.99
    if "torch_bf16" in emb["variants"]:
        assert emb["variants"]["torch_bf16"]["max_abs_diff_vs_fp32"] < 0.2
    assert emb["masks"]["by_backend"]["fp32"]["foreground_fraction"] > 0  # houses on the tile
    dec = r["encoder"]["decoder"]
    assert dec["gflop_32_prompts"] > 0 and dec["variants"]["fp32_32"]["prompts"] >= 1
    # local decoding < whole-tile attention with windowed upscaling < whole-tile masks, in work
    assert dec["gflop_32_prompts"] < dec["gflop_32_prompts_exact"] < dec["gflop_32_prompts_whole"]
    assert dec["variants"]["fp32_32_exact"]["iou_vs_whole"] > 0.98
    assert dec["variants"]["fp32_32"]["iou_vs_whole"] > 0.9  # local decoding: an approximation (~0.95)
    assert r["speed_steps"][0]["gain_vs_baseline"] == 1.0

    rows = {e["variant"]: e for e in r["e2e"]}
    assert [e["variant"] for e in r["e2e"]] == ["auto", "baseline"]  # the default run first, beside training-free
    default = rows["auto"]
    assert default["tiles"] >= 1 and len(default["adapters"]) == 1  # the check's note: what it kept
    # the check and the run share one cache: each reference input (crop, zoomed views, the check's view) is
    # encoded once (7 plain passes before, 4 now)
    assert default["reference_encoded_once"], default["encoder_calls"]
    # tiles at the working scale the run chose (scale auto may zoom in): every one went through the model
    assert default["model_tiles"] + default["reused_tiles"] == default["tiles"]
    if "embedded_virefsam.pt" in default["adapters"][0].split(",")[0]:  # the first file runs: its adapted pass
        # is timed (ORT or torch): one adapted call per tile through the model (the pipeline predicts tile by tile)
        assert default["encoder_calls"]["adapted"] == default["model_tiles"]
        assert default["split"]["encoder (adapted pass)"] > 0
        # the probe's timers leave the stem shared: the adapted pass does not time a second stem (session 19)
        assert default["adapted_stem_shared"] is True
    e2e = rows["baseline"]
    assert e2e["tiles"] >= 1 and e2e["model_tiles"] == e2e["tiles"]
    assert e2e["seconds"] > 0 and e2e["mpix_per_s"] > 0 and 0 <= e2e["non_encoder_share"] <= 1
    for part in ("read", "encoder (frozen pass)", "VCP", "decoder", "stitch", "vectorize", "write"):
        assert e2e["split"][part] >= 0, part
    assert e2e["split"]["encoder (frozen pass)"] > 0
    assert abs(sum(e2e["split"].values()) - e2e["seconds"]) < 1e-2
    assert e2e["encoder_calls"] == {"reference": 1, "tiles": e2e["tiles"], "adapted": 0} or \
        e2e["encoder_calls"]["adapted"] == e2e["tiles"]

    multi = r["multi"]
    assert len(multi["targets"]) == 3
    assert multi["encoder_calls"]["reference"] == 1  # one reference, encoded once for the three targets
    assert multi["encoder_calls"]["tiles"] == multi["tiles"] >= 3
    assert multi["reference_encoded_once"] is True

    mem = r["memory"]
    sizes = [x["size"] for x in mem if x["gdal_cachemax"] == mem[0]["gdal_cachemax"]]
    assert sizes == sorted(sizes) and len(sizes) >= 2
    for x in mem:
        assert x["peak_rss_mb"] > 50 and x["peak_anon_mb"] > 50 and x["tiles"] >= 1
        assert x["model_tiles"] + x["reused_tiles"] == x["tiles"]


def test_e2e_variants_whole_tile_masks_and_vcp_only(tmp_path):
    """The e2e variants added for the decoder windows, local decoding and the VCP-only adapters run the real
    pipeline on a crop: ``whole`` and ``exact`` in the training-free mode with decoding exact, ``vcponly`` in
    the virefsam mode without an adapted encoder pass."""
    import argparse

    from core import bench

    p = argparse.ArgumentParser()
    bench.add_arguments(p)
    args = p.parse_args(["--out", str(tmp_path)])
    target = bench.mosaic_vrt(str(DEMO / "target_kampala.tif"), 512, str(tmp_path / "t.vrt"))
    args.random_adapters_vcp = str(bench.make_random_adapters(args, tmp_path / "vcp.pt", dta=False))
    whole = bench.run_e2e(args, [target], str(tmp_path / "w.gpkg"), variant="whole", log=lambda *a: None)
    exact = bench.run_e2e(args, [target], str(tmp_path / "e.gpkg"), variant="exact", log=lambda *a: None)
    vcp = bench.run_e2e(args, [target], str(tmp_path / "v.gpkg"), variant="vcponly", log=lambda *a: None)
    assert whole["mode"] == "training_free" and whole["split"]["decoder"] > 0
    assert whole["decoding"] == exact["decoding"] == "exact" and exact["split"]["decoder"] > 0
    assert vcp["mode"] == "virefsam" and vcp["encoder_calls"]["adapted"] == 0
    assert vcp["encoder_calls"]["tiles"] == vcp["tiles"] >= 1 and vcp["split"]["VCP"] > 0
