"""The one entry point: ``run(params, progress, is_cancelled) -> RunResult``.

Used by the CLI (``python -m core segment``), the QGIS task and the Processing algorithm alike.

Order of work for one run (one class, K references, N targets):

1. the model: built once per (model, checkpoint, device, precision) and kept for later runs in this process;
2. the references: each reference's geometry becomes a crop and a mask on its raster's grid (scribbles are
   densified with SAM prompted by points along them); the K crops go through the frozen encoder ONCE, and
   the prototypes are built from them (``ReferencePredictor.set_references``);
3. each target raster, tile by tile (read window by window, resampled to the reference's ground
   resolution, all-nodata tiles skipped): ``predict(tile)`` -> probabilities blended into a full-size map on
   disk (no seams, an object across tile borders stays one object);
4. the map is vectorised once per target (polygons in the raster's CRS);
5. the output file, when asked for, is written under a temporary name and renamed when complete, with the
   run's parameters beside it (``<output>.params.json``) so the run can be replayed.

Nothing here imports QGIS or Qt; ``progress(fraction, message)`` and ``is_cancelled()`` are plain callables.
"""

from __future__ import annotations

import os
import threading
import time
from collections import defaultdict
from pathlib import Path
from typing import Callable, Dict, List, Optional

import numpy as np

from .errors import CancelledError, InputError, ModelError
from .params import ModelParams, RunParams
from .paths import RESOURCES
from .results import Feature, RunResult, TargetResult

Progress = Callable[[float, str], None]
IsCancelled = Callable[[], bool]

_ENGINES: Dict[tuple, object] = {}
_ENGINES_LOCK = threading.Lock()


def default_adapters(model_name: str) -> Optional[Path]:
    """The trained VCP + DTA weights shipped for ``model_name`` in ``resources/adapters/``, if there are any."""
    path = RESOURCES / "adapters" / f"{model_name}_virefsam.pt"
    return path if path.is_file() else None


def resolve_adapters(model: ModelParams) -> Optional[Path]:
    """``model.adapters`` as a file path, or None for the training-free mode."""
    if model.adapters in (None, "", "none"):
        return None
    if model.adapters == "default":
        return default_adapters(model.name)
    path = Path(model.adapters)
    if not path.is_file():
        raise ModelError(f"The adapter weights file {path} does not exist.")
    return path


def load_engine(model: ModelParams):
    """The SamEngine for these model parameters, built once per process (thread-safe)."""
    key = (model.name, model.checkpoint, model.device, model.precision, model.threads)
    with _ENGINES_LOCK:
        engine = _ENGINES.get(key)
        if engine is None:
            from .modeling.engine import SamEngine
            from .modeling.registry import build_sam

            engine = SamEngine(build_sam(model.name, model.checkpoint), device=model.device,
                               precision=model.precision, threads=model.threads)
            _ENGINES.clear()  # keep one model in memory at a time
            _ENGINES[key] = engine
        return engine


def make_densifier(engine):
    """``densify(image, fg_points, bg_points) -> mask``: SAM prompted with points along a scribble.

    The crop's embedding is computed once and reused for every scribble on it (``SamEngine.embed`` caches it).
    Of SAM's three candidate masks the one with the highest predicted IoU is kept.
    """

    def densify(image: np.ndarray, fg_points: np.ndarray, bg_points: np.ndarray) -> np.ndarray:
        # SAM is trained with a handful of clicks: at most 8 points along the scribble, 8 background points
        fg = _spread(fg_points, 8)
        bg = _spread(bg_points, 8)
        points = np.concatenate([fg, bg]) if len(bg) else fg
        labels = np.concatenate([np.ones(len(fg)), np.zeros(len(bg))])
        masks, iou, _ = engine.predict(image, points=points, labels=labels, multimask=len(points) == 1)
        return masks[int(np.argmax(iou))]

    return densify


def _spread(points: np.ndarray, n: int) -> np.ndarray:
    points = np.asarray(points, dtype=np.float64).reshape(-1, 2)
    if len(points) <= n:
        return points
    return points[np.linspace(0, len(points) - 1, n).round().astype(int)]


def _check_output(params: RunParams) -> None:
    """Refuse an existing output file or an unwritable folder before any work is done."""
    from .writers import layer_name, output_paths

    if not params.output:
        return
    names = [layer_name(t) for t in params.targets]
    for path in output_paths(params.output, names, params.output_format):
        if os.path.exists(path) and not params.overwrite:
            raise InputError(f"The output file {path} exists already: choose another name or allow overwriting.")
    folder = Path(params.output).resolve().parent
    if not folder.is_dir():
        raise InputError(f"The output folder {folder} does not exist.")
    if not os.access(folder, os.W_OK):
        raise InputError(f"The output folder {folder} is not writable: choose another folder.")


class _Stage:
    """Accumulates wall time per stage into ``timings``."""

    def __init__(self, timings: Dict[str, float]) -> None:
        self.timings = timings

    def __call__(self, name: str):
        stage = self

        class _Timer:
            def __enter__(self):
                self.t0 = time.perf_counter()

            def __exit__(self, *exc):
                stage.timings[name] += time.perf_counter() - self.t0

        return _Timer()


def run(params: RunParams, progress: Optional[Progress] = None,
        is_cancelled: Optional[IsCancelled] = None) -> RunResult:
    """Segment every target raster of ``params`` (see the module docstring)."""
    from .modeling.predictor import ReferencePredictor
    from .raster import RasterSource
    from .reference import build_reference
    from .tiling import ProbabilityStitcher, TileGrid, read_tiles, resolution_scale
    from .vectorize import to_features, vectorize
    from .writers import write_results

    t_start = time.perf_counter()
    timings: Dict[str, float] = defaultdict(float)
    stage = _Stage(timings)
    say: Progress = progress or (lambda f, m="": None)
    cancelled: IsCancelled = is_cancelled or (lambda: False)

    def check_cancel() -> None:
        if cancelled():
            raise CancelledError()

    _check_output(params)

    # 1. model ------------------------------------------------------------------------------------------------
    say(0.0, "loading the model")
    with stage("model"):
        engine = load_engine(params.model)
        adapters = resolve_adapters(params.model) if params.mode == "virefsam" else None
        predictor = ReferencePredictor(engine, mode=params.mode, adapters=adapters, seed=params.seed)
    model_label = params.model.name + ("+adapters" if predictor.mode == "virefsam" else f" ({predictor.mode})")
    check_cancel()

    # 2. references -------------------------------------------------------------------------------------------
    say(0.02, "preparing the reference")
    densify = make_densifier(engine)
    refs = []
    with stage("reference"):
        for spec in params.references:
            refs.append(build_reference(spec, densify=densify, crop_size=params.tile_size, bands=params.bands))
            check_cancel()
        predictor.set_references([(r.image, r.mask) for r in refs])
    ref_pixel_size = refs[0].pixel_size
    ref_ids = ",".join(r.ref_id for r in refs)
    check_cancel()

    # 3. + 4. targets -----------------------------------------------------------------------------------------
    sources: List = []
    results: List[TargetResult] = []
    try:
        for path in params.targets:  # open all first: a bad target fails before hours of work on the others
            sources.append(RasterSource(path, bands=params.bands))
        grids = []
        for src in sources:
            scale = resolution_scale(src.ground_pixel_size(), ref_pixel_size) if params.match_resolution else 1.0
            grids.append(TileGrid(src.width, src.height, params.tile_size, params.overlap, scale))
        total_tiles = max(1, sum(len(g) for g in grids))
        done = 0
        for src, grid in zip(sources, grids):
            t0 = time.perf_counter()
            result = TargetResult(raster=src.path, crs_wkt=src.crs_wkt)
            stitcher = ProbabilityStitcher(src.width, src.height, feather=grid.feather)
            try:
                n_valid = 0
                tiles = read_tiles(src, grid, skip_empty=True, is_cancelled=cancelled)
                while True:
                    with stage("read"):
                        item = next(tiles, None)
                    if item is None:
                        break
                    tile, rgb, valid = item
                    with stage("predict"):
                        prob = predictor.predict(rgb)
                    with stage("stitch"):
                        stitcher.add(tile.window, prob, valid)
                    n_valid += 1
                    done = _tiles_before(grids, grid) + tile.index + 1
                    say(0.05 + 0.85 * done / total_tiles, f"{src.name}: tile {tile.index + 1}/{len(grid)}")
                if n_valid == 0:
                    result.skipped = "no valid pixel (all nodata)"
                else:
                    with stage("vectorize"):
                        prob_map = stitcher.finalize()
                        detections = vectorize(
                            prob_map, src.transform, crs=src.crs, threshold=params.threshold,
                            min_area=params.min_area * grid.scale ** 2, simplify=params.simplify * grid.scale,
                            fill_holes=params.fill_holes, is_cancelled=cancelled,
                        )
                        result.features = to_features(
                            detections, class_name=params.class_name, source=src.path, ref_id=ref_ids,
                            model=model_label,
                        )
            finally:
                stitcher.close()
            result.seconds = time.perf_counter() - t0
            results.append(result)
            check_cancel()
    finally:
        for src in sources:
            src.close()

    # 5. output -----------------------------------------------------------------------------------------------
    output = None
    if params.output:
        say(0.95, "writing")
        with stage("write"):
            written = write_results(params.output, results, params.output_format, overwrite=params.overwrite,
                                    is_cancelled=cancelled)
            output = written[0] if written else params.output
            Path(output + ".params.json").write_text(params.to_json())
    say(1.0, "done")
    return RunResult(params=params, targets=results, output=output, seconds=time.perf_counter() - t_start,
                     timings=dict(timings))


def _tiles_before(grids, grid) -> int:
    n = 0
    for g in grids:
        if g is grid:
            return n
        n += len(g)
    return n


__all__ = ["run", "load_engine", "make_densifier", "default_adapters", "resolve_adapters", "Feature"]
