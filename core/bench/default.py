"""Measurements of the default (adapters) path, as functions returning dicts (wired into ``make bench``).

* :func:`e2e_default_vs_training_free` - ``core.pipeline.run`` on one reference and the 4096x4096 orthophoto,
  the default path (shipped adapters) and the training-free mode interleaved (A, B, A, B, ...), with the split
  of the time: plain encoder pass (reference / tiles), adapted pass, VCP, decoder, pre/postprocess, read,
  stitch, vectorise, write.
* :func:`load_latency` - model load and first-tile latency in a fresh process: engine build, adapters load,
  the adapted graph's export (cold, into a temporary folder) and its session from the cache, the predictor of a
  first and a second run, the first and second tile.

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
from collections import defaultdict
from pathlib import Path
from typing import Callable, Dict, List, Optional

from ..paths import PACKAGE_ROOT, RESOURCES
from .inputs import reference_spec

SHARED_DATA = (PACKAGE_ROOT.parent / "shared" / "data").resolve()
DEFAULT_TARGET = SHARED_DATA / "oam_mosaics" / "zanzibar.tif"
DEFAULT_REFERENCE = RESOURCES / "demo" / "reference.tif"
DEFAULT_GEOMETRY = RESOURCES / "demo" / "reference_houses.geojson"


class _Clock:
    """Wall time and call counts per part; ``wrap(obj, name, part)`` times ``obj.name`` until :meth:`undo`."""

    def __init__(self) -> None:
        self.seconds: Dict[str, float] = defaultdict(float)
        self.calls: Dict[str, int] = defaultdict(int)
        self._undo: List[Callable[[], None]] = []

    def wrap(self, obj, name: str, part) -> None:
        orig = getattr(obj, name)
        own = name in getattr(obj, "__dict__", {})

        def timed(*a, **k):
            t0 = time.perf_counter()
            try:
                return orig(*a, **k)
            finally:
                key = part(*a, **k) if callable(part) else part
                self.seconds[key] += time.perf_counter() - t0
                self.calls[key] += 1

        setattr(obj, name, timed)
        self._undo.append(lambda: setattr(obj, name, orig) if own else delattr(obj, name))

    def undo(self) -> None:
        while self._undo:
            self._undo.pop()()


def _params(mode: str, target: str, reference: str, geometry: str, output: str, threads: int,
            device: str = "cpu", precision: str = "fp32"):
    from ..params import ModelParams, RunParams

    return RunParams(class_name="building", references=(reference_spec(reference, geometry),), targets=(target,),
                     output=output, overwrite=True, mode=mode,
                     model=ModelParams(adapters="default" if mode == "virefsam" else None, device=device,
                                       precision=precision, threads=threads))


def _timed_run(params, clock: _Clock):
    """One pipeline.run with the model's parts timed (module attributes patched for this run only)."""
    from .. import pipeline
    from ..modeling import predictor as predictor_module
    from ..modeling import virefsam as virefsam_module

    engine = pipeline.load_engine(params.model)
    phase = {"now": "reference"}
    make = pipeline.make_predictor

    def make_predictor(eng, p, adapters, cache=None):
        pred = make(eng, p, adapters, cache=cache)
        model = pred.model
        if model is not None:
            if model.adapted_runner is not None:
                clock.wrap(model, "adapted_runner", "adapted pass")
            else:
                clock.wrap(model, "encoder", "adapted pass")
            clock.wrap(model.vcp, "refine", "VCP")
            clock.wrap(model.vcp, "queries", "VCP")
        return pred

    pipeline.make_predictor = make_predictor  # looked up by pipeline.run at call time
    clock._undo.append(lambda: setattr(pipeline, "make_predictor", make))
    plain_obj, plain_name = (engine._ort, "run_with_stem") if engine._ort is not None else (engine, "encode")
    clock.wrap(plain_obj, plain_name, lambda *a, **k: f"plain pass ({phase['now']})")
    clock.wrap(engine, "preprocess", "pre/postprocess")
    clock.wrap(engine, "postprocess", "pre/postprocess")
    clock.wrap(virefsam_module, "decode_per_image", "decoder")
    clock.wrap(predictor_module, "training_free_logits", "decoder")
    orig_predict = predictor_module.ReferencePredictor.predict_batch

    def predict_batch(self, images):
        phase["now"] = "tiles"
        return orig_predict(self, images)

    predictor_module.ReferencePredictor.predict_batch = predict_batch
    clock._undo.append(lambda: setattr(predictor_module.ReferencePredictor, "predict_batch", orig_predict))
    try:
        return pipeline.run(params)
    finally:
        clock.undo()


def e2e_default_vs_training_free(target: Optional[str] = None, reference: Optional[str] = None,
                                 geometry: Optional[str] = None, rounds: int = 1, threads: int = 0,
                                 log: Callable[[str], None] = print, device: str = "cpu",
                                 precision: str = "fp32") -> dict:
    """Default path vs training-free, interleaved ``rounds`` times on ``target`` (default: zanzibar.tif).

    Returns ``{"modes": {mode: {...}}, "ratio_mp_s": default / training-free, "load_average": [...]}``; per
    mode the median total seconds (model load excluded: the engine is built before the first round and the
    adapted graph exported), megapixels/s, all rounds, and the median split of a run into parts (seconds and
    share of the total; ``non-encoder share`` = 1 - (plain + adapted passes) / total).
    """
    import rasterio

    from .. import pipeline

    target = str(target or DEFAULT_TARGET)
    reference = str(reference or DEFAULT_REFERENCE)
    geometry = str(geometry or DEFAULT_GEOMETRY)
    with rasterio.open(target) as src:
        mp = src.width * src.height / 1e6
    load_before = list(os.getloadavg())
    modes = ("virefsam", "training_free")
    runs: Dict[str, List[dict]] = {m: [] for m in modes}
    with tempfile.TemporaryDirectory() as tmp:
        warm = _params("virefsam", target, reference, geometry, None, threads, device, precision)
        pipeline.make_predictor(pipeline.load_engine(warm.model), warm, pipeline.resolve_adapters(warm.model))
        for r in range(rounds):
            for mode in modes:
                clock = _Clock()
                t0 = time.perf_counter()
                res = _timed_run(_params(mode, target, reference, geometry, str(Path(tmp) / f"{mode}.gpkg"),
                                         threads, device, precision), clock)
                total = time.perf_counter() - t0 - res.timings.get("model", 0.0)
                parts = dict(clock.seconds)
                for k in ("read", "stitch", "vectorize", "write"):
                    parts[k] = res.timings.get(k, 0.0)
                parts["model load"] = res.timings.get("model", 0.0)
                runs[mode].append({"seconds": total, "parts": parts, "calls": dict(clock.calls),
                                   "features": sum(len(t.features) for t in res.targets)})
                log(f"  round {r + 1} {mode}: {total:.1f} s, {mp / total:.3f} MP/s")
    out = {"target": target, "megapixels": round(mp, 2), "rounds": rounds, "device": device,
           "precision": precision, "load_average_before": load_before,
           "load_average_after": list(os.getloadavg()), "modes": {}}
    for mode, rs in runs.items():
        total = statistics.median(r["seconds"] for r in rs)
        keys = sorted({k for r in rs for k in r["parts"]})
        parts = {k: round(statistics.median(r["parts"].get(k, 0.0) for r in rs), 3) for k in keys}
        encoder = sum(v for k, v in parts.items() if k.startswith("plain pass") or k == "adapted pass")
        out["modes"][mode] = {
            "seconds": round(total, 2), "all_rounds": [round(r["seconds"], 2) for r in rs],
            "megapixels_per_s": round(mp / total, 3), "parts": parts,
            "shares": {k: round(v / total, 3) for k, v in parts.items() if k != "model load"},
            "non_encoder_share": round(1 - encoder / total, 3), "calls": rs[-1]["calls"],
            "features": rs[-1]["features"],
        }
    out["ratio_mp_s"] = round(out["modes"]["virefsam"]["megapixels_per_s"]
                              / out["modes"]["training_free"]["megapixels_per_s"], 3)
    return out


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
t0 = time.perf_counter(); pred.set_references([(ref.image, ref.mask)]); t["references (1 plain pass)"] = time.perf_counter() - t0
import rasterio
from rasterio.windows import Window
with rasterio.open(sys.argv[4]) as src:
    tiles = [src.read([1, 2, 3], window=Window(x, 1024, 1024, 1024)).transpose(1, 2, 0).copy() for x in (1024, 2048)]
t0 = time.perf_counter(); pred.predict(tiles[0]); t["first tile"] = time.perf_counter() - t0
t0 = time.perf_counter(); pred.predict(tiles[1]); t["second tile"] = time.perf_counter() - t0
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


__all__ = ["e2e_default_vs_training_free", "encoder_timing", "load_latency"]
