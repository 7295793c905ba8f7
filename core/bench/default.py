"""Measurements of the default (adapters) path, as functions returning dicts (wired into ``make bench`` and
``make gpu-check``; the end-to-end rows are :mod:`.e2e`'s).

* :func:`load_latency` - model load and first-tile latency in a fresh process: engine build, adapters load,
  the adapted graph's export (cold, into a temporary folder) and its session from the cache, the predictor of a
  first and a second run, the first and second tile, and a second run's references and first tile (their plain
  passes kept by the engine).
* :func:`encoder_timing` - one 1024x1024 image-encoder pass per model and precision, on the CPU or CUDA.

Both time real runs: the machine's load average is recorded beside the numbers.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, List, Optional

from ..paths import PACKAGE_ROOT, RESOURCES
from .inputs import reference_spec

SHARED_DATA = (PACKAGE_ROOT.parent / "shared" / "data").resolve()
DEFAULT_TARGET = SHARED_DATA / "oam_mosaics" / "zanzibar.tif"
DEFAULT_REFERENCE = RESOURCES / "demo" / "reference.tif"
DEFAULT_GEOMETRY = RESOURCES / "demo" / "reference_houses.geojson"


_LATENCY_SCRIPT = r"""
import json, os, sys, tempfile, time
from pathlib import Path
t = {}
t0 = time.perf_counter()
from core import pipeline
from core.params import ModelParams, RunParams
from core.bench.default import reference_spec
t["import core.pipeline"] = time.perf_counter() - t0
model = ModelParams(adapters="default", device="cpu", threads=int(sys.argv[1]))
t0 = time.perf_counter(); engine = pipeline.load_engine(model); t["engine build (cold)"] = time.perf_counter() - t0
t0 = time.perf_counter(); pipeline.load_engine(model); t["engine (second run)"] = time.perf_counter() - t0
from core.modeling.virefsam import ViRefSAM
from core.modeling import ort_adapted
path = pipeline.resolve_adapters(model)
t0 = time.perf_counter(); m = ViRefSAM.from_adapters(engine.sam, path); t["adapters load"] = time.perf_counter() - t0
t0 = time.perf_counter(); key = ort_adapted.graph_key(m.encoder); t["graph key (sha256)"] = time.perf_counter() - t0
with tempfile.TemporaryDirectory() as tmp:
    t0 = time.perf_counter(); ort_adapted.export(m.encoder, Path(tmp) / "a.onnx")
    t["adapted graph export (cold)"] = time.perf_counter() - t0
    t0 = time.perf_counter(); ort_adapted.quantize(Path(tmp) / "a.onnx")
    t["adapted graph int8 quantisation (cold)"] = time.perf_counter() - t0
cached = ort_adapted.int8_path(ort_adapted.graph_path(m.encoder, key)).is_file()
t0 = time.perf_counter(); ort_adapted.OrtAdaptedEncoder(m.encoder, threads=model.threads, key=key)
t["adapted sessions" + (" (graph cached)" if cached else " (graph exported now)")] = time.perf_counter() - t0
params = RunParams(class_name="building", references=(reference_spec(sys.argv[2], sys.argv[3]),),
                   targets=(sys.argv[4],), model=model)
t0 = time.perf_counter(); pred = pipeline.make_predictor(engine, params, path)
t["predictor, first run"] = time.perf_counter() - t0
t0 = time.perf_counter(); pipeline.make_predictor(engine, params, path); t["predictor, second run"] = time.perf_counter() - t0
from core.reference import build_reference
ref = build_reference(params.references[0], crop_size=1024)
t0 = time.perf_counter(); pred.set_references([(ref.image, ref.mask)]); t["references, first run"] = time.perf_counter() - t0
import rasterio
from rasterio.windows import Window
with rasterio.open(sys.argv[4]) as src:
    tiles = [src.read([1, 2, 3], window=Window(x, 1024, 1024, 1024)).transpose(1, 2, 0).copy() for x in (1024, 2048)]
t0 = time.perf_counter(); pred.predict(tiles[0]); t["first tile"] = time.perf_counter() - t0
t0 = time.perf_counter(); pred.predict(tiles[1]); t["second tile"] = time.perf_counter() - t0
pred = pipeline.make_predictor(engine, params, path)  # the dock's next run: the plain passes are in the engine
t0 = time.perf_counter(); pred.set_references([(ref.image, ref.mask)])
t["references, second run (plain passes kept)"] = time.perf_counter() - t0
t0 = time.perf_counter(); pred.predict(tiles[0]); t["first tile, second run (plain pass kept)"] = time.perf_counter() - t0
print(json.dumps({k: round(v, 3) for k, v in t.items()}))
"""


def load_latency(threads: int = 0, target: Optional[str] = None) -> dict:
    """Model load and first-tile latency in a fresh Python process (cold imports, cold engine); seconds per step.

    The adapted graph's export is timed into a temporary folder (cold, whatever the cache holds); its sessions
    are then opened from the model cache (exported there first if it was not)."""
    load = list(os.getloadavg())
    proc = subprocess.run(
        [sys.executable, "-c", _LATENCY_SCRIPT, str(threads), str(DEFAULT_REFERENCE), str(DEFAULT_GEOMETRY),
         str(target or DEFAULT_TARGET)],
        cwd=str(PACKAGE_ROOT), capture_output=True, text=True, timeout=1800,
    )
    if proc.returncode != 0:
        raise RuntimeError(proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else "latency run failed")
    return {"seconds": json.loads(proc.stdout.strip().splitlines()[-1]), "load_average_before": load,
            "load_average_after": list(os.getloadavg())}


def encoder_timing(device: str = "cpu", precisions=("fp32",), models=("embedded", "vit_b"), rounds: int = 3,
                   threads: int = 0) -> dict:
    """Seconds per 1024x1024 image-encoder pass (PyTorch; median of ``rounds`` after one warm-up; CUDA
    synchronised) for the embedded model (real weights) and vit_b (random init: time does not depend on the
    weights), per precision; on the CPU in fp32 also ONNX Runtime's plain pass for the embedded model."""
    import torch

    from ..device import set_threads
    from ..modeling.registry import build_architecture, build_sam

    set_threads(threads)
    dev = torch.device(device)
    dtypes = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
    x = torch.randn(1, 3, 1024, 1024, device=dev)
    out: Dict[str, dict] = {}
    for name in models:
        sam = build_sam("embedded") if name == "embedded" else build_architecture(name)
        enc = sam.image_encoder.to(dev).eval()
        res = {"weights": "real" if name == "embedded" else "random init"}
        for prec in precisions:
            def one():
                with torch.inference_mode(), torch.autocast(dev.type, dtype=dtypes[prec],
                                                            enabled=prec != "fp32"):
                    enc(x)
                if dev.type == "cuda":
                    torch.cuda.synchronize()
            one()
            times = []
            for _ in range(rounds):
                t0 = time.perf_counter()
                one()
                times.append(time.perf_counter() - t0)
            res[f"torch_{prec}"] = {"seconds": round(statistics.median(times), 4),
                                    "all": [round(t, 4) for t in times]}
        if name == "embedded" and dev.type == "cpu" and "fp32" in precisions:
            from ..modeling import ort_encoder

            if ort_encoder.available():
                ort = ort_encoder.OrtImageEncoder(threads=threads)
                ort(x)
                times = []
                for _ in range(rounds):
                    t0 = time.perf_counter()
                    ort(x)
                    times.append(time.perf_counter() - t0)
                res["onnxruntime_fp32"] = {"seconds": round(statistics.median(times), 4),
                                           "all": [round(t, 4) for t in times]}
        out[name] = res
        del sam, enc
        if dev.type == "cuda":
            torch.cuda.empty_cache()
    return out


__all__ = ["encoder_timing", "load_latency"]
