"""What a Dask worker runs for :mod:`core.cluster` (imported on the worker as ``core.cluster_worker``).

Everything that crosses the wire is plain (str, dict, tuple, numpy arrays): the client may be the QGIS plugin,
where this package is ``virefsam.core``, while the worker imports it as ``core``.

Per worker process, kept between tasks and runs:

* the engine (``core.engines.load_engine``: one model per process; the embedded model's cache on the worker's
  own disk, set up there when missing) and one predictor per (run's model/predictor parameters), whose
  references are loaded from the run's scattered reference state (:meth:`ReferencePredictor.load_reference_state`),
  never encoded again;
* the open target rasters (``RasterSource``), the last few.

:func:`predict_tiles` answers ``{"worker", "tiles": [(index, prob float32 HxW | None, valid packed | None)],
"error": None | {"kind": "read" | "model", "file", "message"}}``: a user's fault (a raster the worker cannot
read, a model it cannot load) comes back as a value, so the client can say it in one sentence naming the worker.
"""

from __future__ import annotations

import dataclasses
import os
import threading
import time
from collections import OrderedDict
from typing import Dict, Optional, Tuple

import numpy as np

from .errors import VirefsamError

_LOCK = threading.Lock()  # one predictor per process, used by one task at a time
_PREDICTORS: "OrderedDict[tuple, tuple]" = OrderedDict()  # key -> (predictor, state token)
_SOURCES: "OrderedDict[tuple, object]" = OrderedDict()
_PARAMS: Dict[str, object] = {}
STATS = {"engines_built": 0, "references_loaded": 0}


def _address() -> str:
    try:
        from distributed import get_worker

        return get_worker().address
    except Exception:  # noqa: BLE001 - called outside a worker (tests of this module)
        return f"pid {os.getpid()}"


def worker_threads(model_threads: int) -> int:
    """CPU threads for torch on this worker: the run's ``model.threads`` when set, else
    ``$VIREFSAM_WORKER_THREADS``, else this machine's cores divided by the worker's task threads (Dask's nanny
    sets OMP_NUM_THREADS=1 in workers, which would leave torch on one core)."""
    if model_threads:
        return int(model_threads)
    env = os.environ.get("VIREFSAM_WORKER_THREADS", "")
    if env.isdigit() and int(env) > 0:
        return int(env)
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        cores = os.cpu_count() or 1
    try:
        from distributed import get_worker

        n = max(1, int(get_worker().state.nthreads))
    except Exception:  # noqa: BLE001
        n = 1
    return max(1, cores // n)


def _params(params_json: str):
    from .params import RunParams

    p = _PARAMS.get(params_json)
    if p is None:
        _PARAMS.clear()
        p = _PARAMS[params_json] = RunParams.from_json(params_json)
    return p


def _predictor(params, state_token: str, reference: dict):
    from .engines import adapter_candidates, load_engine, run_predictor

    model = dataclasses.replace(params.model, threads=worker_threads(params.model.threads))
    key = (model, params.mode, params.seed, params.decoding, params.kshot, params.tune_steps, params.tune_files,
           params.zoom_views)
    entry = _PREDICTORS.get(key)
    if entry is None:
        if params.mode == "virefsam":
            adapter_candidates(model)  # a missing adapters file fails here, before any engine is built
        engine = load_engine(model)
        STATS["engines_built"] += 1
        entry = [run_predictor(engine, dataclasses.replace(params, model=model)), None]  # a blend: params weigh it
        _PREDICTORS.clear()  # load_engine keeps one model per process: so do we
        _PREDICTORS[key] = entry
    if entry[1] != state_token:
        entry[0].load_reference_state(reference)
        entry[1] = state_token
        STATS["references_loaded"] += 1
    return entry[0]


def _source(path: str, bands):
    from .raster import RasterSource

    try:
        stamp = os.stat(path).st_mtime_ns  # a file written again since: opened again
    except OSError:
        stamp = None  # a GDAL path (/vsicurl/...) or missing: RasterSource says so
    key = (path, None if bands is None else tuple(bands), stamp)
    src = _SOURCES.get(key)
    if src is None:
        src = RasterSource(path, bands=key[1])
        _SOURCES[key] = src
        while len(_SOURCES) > 4:
            _SOURCES.popitem(last=False)[1].close()
    _SOURCES.move_to_end(key)
    return src


def _model_file(params) -> str:
    m = params.model
    if params.mode == "virefsam" and m.adapters not in (None, "", "none", "default", "auto"):
        return str(m.adapters)
    if m.name != "embedded":
        return str(m.checkpoint)
    from .paths import cache_dir

    return str(cache_dir())


def predict_tiles(job: dict, shared: dict) -> dict:
    """``job``: ``{"token": the run's id, "path", "bands", "tiles": [(index, col_off, row_off, width, height,
    out_rows, out_cols), ...]}``; ``shared`` (scattered once per run): ``{"state": the client predictor's
    :meth:`ReferencePredictor.reference_state`, "params": the RunParams JSON}``. Returns the tiles' probabilities as computed (float32: see
    :mod:`core.cluster` for why not uint8), and their valid masks packed (None: all valid)."""
    from rasterio.windows import Window

    from .tiling import Tile, tile_job

    out = {"worker": _address(), "tiles": [], "error": None, "seconds": 0.0, "setup_seconds": 0.0}
    params = _params(shared["params"])
    with _LOCK:
        t0 = time.perf_counter()
        try:
            predictor = _predictor(params, job["token"], shared["state"])
            out["setup_seconds"] = time.perf_counter() - t0  # the model's build, once per worker process
        except VirefsamError as exc:
            out["error"] = {"kind": "model", "file": _model_file(params), "message": str(exc)}
            return out
        try:
            src = _source(job["path"], job["bands"])
        except VirefsamError as exc:
            out["error"] = {"kind": "read", "file": job["path"], "message": str(exc)}
            return out
        for index, c, r, w, h, oh, ow in job["tiles"]:
            tile = Tile(index, 0, 0, Window(c, r, w, h), (oh, ow))
            try:
                res = tile_job(src, tile, predictor.predict)
            except VirefsamError as exc:
                out["error"] = {"kind": "read", "file": job["path"], "message": str(exc)}
                return out
            if res is None:
                out["tiles"].append((index, None, None))
                continue
            prob, valid = res
            packed = None if valid.all() else (np.packbits(valid), valid.shape)
            out["tiles"].append((index, np.ascontiguousarray(prob, dtype=np.float32), packed))
    out["seconds"] = time.perf_counter() - t0
    return out


def versions() -> dict:
    """What must be the same on the client and every worker: the packages that compute, and this code."""
    return {"packages": package_versions(), "core": code_fingerprint(), "worker": _address()}


def package_versions() -> Dict[str, str]:
    from importlib import metadata

    out = {}
    for name in ("torch", "numpy", "onnxruntime", "segment-anything", "dask", "distributed", "rasterio"):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = "missing"
    return out


def code_fingerprint() -> str:
    """sha256 (first 12 hex digits) of this package's Python sources: the same code on client and workers."""
    import hashlib
    from pathlib import Path

    root = Path(__file__).resolve().parent
    h = hashlib.sha256()
    for p in sorted(root.rglob("*.py")):
        h.update(str(p.relative_to(root)).encode())
        h.update(p.read_bytes())
    return h.hexdigest()[:12]


def stats() -> dict:
    return {"worker": _address(), **STATS}


def unpack(entry: Tuple[int, Optional[np.ndarray], Optional[tuple]]):
    """``(index, prob float32 or None, valid bool or None)`` from one entry of :func:`predict_tiles`."""
    index, prob, packed = entry
    if prob is None:
        return index, None, None
    if packed is None:
        return index, prob, np.ones(prob.shape, bool)
    bits, shape = packed
    valid = np.unpackbits(bits, count=int(shape[0]) * int(shape[1])).astype(bool).reshape(shape)
    return index, prob, valid
