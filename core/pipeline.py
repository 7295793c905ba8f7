"""The one entry point: ``run(params, progress, is_cancelled) -> RunResult``.

Used by the CLI (``python -m core segment``), the QGIS task and the Processing algorithm alike.

Order of work for one run (one class, K references, N targets):

0. the inputs, before any model is loaded: the output location, the adapter file, every reference (its
   geometry, CRS and raster) and every target raster are checked, so that a wrong path or a bad file ends in
   one sentence within a second instead of after the model has loaded;
1. the model: built once per (model, checkpoint, device, precision) and kept for later runs in this process;
2. the references: the working scale is chosen from the marked objects' size (``RunParams.scale``, see
   :mod:`core.scale`), and each cluster of marked objects becomes one crop at that scale (a shot; scribbles
   are densified with SAM prompted by points along them); the K crops go through the frozen encoder ONCE,
   and the prototypes are built from them (``ReferencePredictor.set_references``);
3. each target raster, tile by tile (read window by window, resampled to the working ground resolution,
   all-nodata tiles skipped): ``predict(tile)`` -> probabilities blended into a full-size map on
   disk (no seams, an object across tile borders stays one object);
4. the map is vectorised once per target (polygons in the raster's CRS);
5. the output file, when asked for, is written under a temporary name and renamed when complete, with the
   run's parameters beside it (``<output>.params.json``) so the run can be replayed.

Several classes (``RunParams.classes``): each class's references at the first class's working resolution, one
predictor per class sharing a cache of tile embeddings, so that in 3. each tile is read and passed through the
frozen encoder once and predicted per class (trained mode: one adapted encoder pass for all classes too,
:mod:`core.modeling.joint_dta`, unless ``shared_adapted_pass`` is off); in 4. where classes overlap the more
probable class keeps each pixel (:func:`keep_most_probable`, :func:`cut_enclosed`) unless ``allow_overlap``; one
result per target holds every class's polygons (``class_name``). Negative references ("Not <class>") become each class's negative examples.

Nothing here imports QGIS or Qt; ``progress(fraction, message)`` and ``is_cancelled()`` are plain callables.

The stages' helpers have files of their own (their names stay importable from here): :mod:`core.run_output` (the
output file, checked in 0.), :mod:`core.run_references` (the classes' reference sets, the cache held for them, the
check that weighs adapters files in 2.), :mod:`core.densify` (scribbles), :mod:`core.gpu_fallback` (out of GPU
memory) and :mod:`core.class_overlap` (several classes without overlap, in 4.).

Out of GPU memory: when CUDA runs out of memory while encoding the references or predicting a tile, the CUDA
cache is emptied and the run goes on with the same model on the CPU (the tile is predicted again there); the
run's result says so in ``RunResult.notes`` (and therefore in its summary), and the progress message too.

Several runs may go on at once in threads of one process (the QGIS task manager, Processing); they share the
cached model, which is only read, and nothing else.
"""

from __future__ import annotations

import dataclasses
import time
from collections import OrderedDict, defaultdict
from pathlib import Path
from typing import Callable, Dict, List, Optional

import numpy as np

from .class_overlap import cut_enclosed, keep_most_probable
from .densify import DENSIFY_CPU_NOTE, make_densifier  # noqa: F401  (DENSIFY_CPU_NOTE: named here before)
from .errors import CancelledError
from .engines import (adapter_candidates, check_precision, default_adapters, load_engine, make_predictor,  # noqa: F401
                      resolve_adapters, run_predictor)
from .gpu_fallback import CPU_FALLBACK_NOTE, _empty_cuda_cache, _is_cuda_oom
from .params import RunParams
from .results import Feature, RunResult, TargetResult
from .run_output import _check_output, _layer_classes, vector_writing_available  # noqa: F401  (named here before)
from .run_references import _class_references, _hold_cache, _weigh_adapters, tuning_choice
from .scale import ZOOM_VIEWS, smallest_object_area

Progress = Callable[[float, str], None]
IsCancelled = Callable[[], bool]


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
    from .raster import RasterSource
    from .executors import make_executor
    from .modeling import joint_dta
    from .tiling import ProbabilityStitcher, TileGrid, resolution_scale
    from .vectorize import to_features, vectorize

    t_start = time.perf_counter()
    timings: Dict[str, float] = defaultdict(float)
    stage = _Stage(timings)
    say: Progress = progress or (lambda f, m="": None)
    cancelled: IsCancelled = is_cancelled or (lambda: False)
    notes: List[str] = []

    def check_cancel() -> None:
        if cancelled():
            raise CancelledError()

    # 0. inputs, before the model ----------------------------------------------------------------------------
    say(0.0, "checking the inputs")
    _check_output(params)
    check_precision(params.model)
    # every adapters file named exists (several: "auto" or a comma list, weighed on the reference below)
    candidates = adapter_candidates(params.model) if params.mode == "virefsam" else []
    sources: List = []
    results: List[TargetResult] = []
    executor = None  # [cluster #17] who runs the tile loop (core.executors)
    classes = params.class_specs()
    try:
        with stage("reference"):  # without SAM: scribbles are densified again once the model is there
            ref_sets = _class_references(params, classes)
        for path in params.targets:  # open all first: a bad target fails before any work on the others
            sources.append(RasterSource(path, bands=params.bands))
        check_cancel()
        executor = make_executor(params, say)  # [cluster #17] a cluster is reached and checked before any work

        # 1. model --------------------------------------------------------------------------------------------
        say(0.01, "loading the model")
        model = params.model
        # several classes: one predictor each, sharing one cache of tile embeddings (each tile's plain pass once);
        # several adapters files: the check on the reference and the run share the reference crops' plain passes
        # (tune_files "auto": the check's predictor and the run's share them too)
        shared = OrderedDict() if len(classes) > 1 or len(candidates) > 1 or params.tune_files == "auto" else None
        with stage("model"):
            engine = load_engine(model)
            predictors = [run_predictor(engine, params, cache=shared) for _ in classes]
        mode = predictors[0].mode
        model_label = model.name + ("+adapters" if mode == "virefsam" else f" ({mode})")
        check_cancel()

        # 2. references ---------------------------------------------------------------------------------------
        say(0.02, "preparing the reference")
        densify = make_densifier(engine)
        with stage("reference"):
            if any(r.kind != "polygon" for rs in ref_sets for r in rs.refs):
                ref_sets = _class_references(params, classes, densify)
            check_cancel()
        for rs in ref_sets:
            notes.extend(rs.notes)
        if densify.on_cpu:
            notes.append(densify.note)
        refs, scale = ref_sets[0]
        n_crops = sum(len(rs.refs) for rs in ref_sets)
        scale_note = f"The {scale.describe()}; {n_crops} reference crop{'s' if n_crops != 1 else ''}."
        shots = [[(r.image, r.mask) for r in rs.refs] for rs in ref_sets]
        negatives = [[(r.image, r.background) for r in rs.negatives] for rs in ref_sets]  # "not this class"
        # the shared cache keeps every reference input until the run's predictors are set (a one-crop check also
        # segments a view of the crop; the run sees its zoomed views): each is encoded once, not again after
        # eviction by the others
        hold = sum(len(s) + len(ZOOM_VIEWS) + 1 for s in shots) if shared is not None else None
        held = _hold_cache(predictors, hold)
        weigh_files = len(candidates) > 1 and len(params.model.adapter_weights) != len(candidates)
        # tune_files "auto": the check on the reference decides whether the DTA file is tuned too (core.choice)
        resolve_tuning = params.tune_files == "auto" and params.tune_steps > 0 and mode == "virefsam"
        if weigh_files or resolve_tuning:
            # adapters "auto" (two shipped files) or a comma list: the reference weighs the files (core.choice)
            say(0.02, "weighing the adapters on the reference" if weigh_files else "checking the reference")
            files = candidates if weigh_files else candidates[:1]
            with stage("reference"):
                weights, checks, note = _weigh_adapters(engine, params, shots, files, shared, hold)
            check_cancel()
            if weigh_files:
                notes.append(note)
            kept = [(str(f), w) for f, w in zip(files, weights) if w > 0]
            changed = {}
            if weigh_files:  # the written params name the files and weights used: a replay or a Dask worker
                changed["model"] = dataclasses.replace(  # does not check again
                    params.model, adapters=",".join(f for f, _ in kept),
                    adapter_weights=tuple(round(w, 4) for _, w in kept) if len(kept) > 1 else ())
            if resolve_tuning:
                changed["tune_files"], tuning_note = tuning_choice(weights, checks)
                notes.append(tuning_note)
            params = dataclasses.replace(params, **changed)
            model = params.model
            if len(kept) > 1 or Path(kept[0][0]) != candidates[0] or changed.get("tune_files") == "all":
                predictors = [run_predictor(engine, params, cache=shared) for _ in classes]  # not as built above
                held = _hold_cache(predictors, hold)
            if hasattr(executor, "params"):  # a cluster's workers build their predictor from the run's params
                executor.params = params

        def set_references() -> None:
            for c, pred, s, n in zip(classes, predictors, shots, negatives):
                if getattr(pred, "tune_steps", 0) and pred.mode == "virefsam":  # run-time tuning: its own step
                    def tuned(i, total, name=c.name):
                        say(0.02 + 0.03 * i / total, f"tuning on the references of {name} ({i}/{total})")
                        check_cancel()

                    pred.tune_progress = tuned
                pred.set_references(s, n)

        def on_cpu(fail: BaseException):
            """The same model on the CPU, references set again (after CUDA ran out of memory)."""
            nonlocal engine, predictors, model
            if CPU_FALLBACK_NOTE in notes:  # already on the CPU: nothing left to try
                raise fail
            predictors = engine = None
            _empty_cuda_cache()
            model = dataclasses.replace(model, device="cpu", precision="fp32")
            notes.append(CPU_FALLBACK_NOTE)
            say(0.05, "GPU out of memory: going on on the CPU")
            engine = load_engine(model)
            cache = OrderedDict() if len(classes) > 1 else None
            predictors = [run_predictor(engine, params, cache=cache) for _ in classes]
            set_references()

        def cuda_safe(call, again: bool = True):
            """``call()``; on CUDA out of memory, once: the CPU fallback, then ``call()`` again if ``again``."""
            try:
                return call()
            except Exception as exc:  # noqa: BLE001 - only CUDA's out-of-memory is handled here
                if not _is_cuda_oom(exc):
                    raise
                oom = exc.with_traceback(None)  # let go of the failed frames and the GPU tensors they hold
            on_cpu(oom)  # sets the references on the CPU
            return call() if again else None

        with stage("reference"):
            cuda_safe(set_references, again=False)
        for part, size in held:  # the tiles: each predictor's own cache size again
            part.cache_size = size
        from .modeling.reference_prototypes import PARTIAL_MARKS

        for c, pred, negs in zip(classes, predictors, negatives):
            found = [p.found_beyond for p in getattr(pred, "predictors", [pred])
                     if getattr(p, "found_beyond", None) is not None]
            if found and max(found) > PARTIAL_MARKS:
                notes.append(f"The marks of '{c.name}' look partial: in the reference crops the model finds "
                             f"{max(found):.1f}x the marked area in unmarked objects, left out of the background.")
            if negs:
                n_neg = getattr(pred, "n_negatives", 0)
                notes.append(f"{n_neg} negative example{'s' if n_neg != 1 else ''} (marked 'not {c.name}') "
                             "used as background prototypes." if n_neg else
                             f"The negative examples were not used: the {pred.mode} mode has no prototypes.")
        ref_pixel_size = refs[0].pixel_size
        ref_ids = [",".join(r.ref_id for r in rs.refs) for rs in ref_sets]
        # per class, in working pixels: min_area, or the share of its smallest marked object when that is larger
        min_areas = [max(params.min_area, params.min_object_share * smallest_object_area([r.mask for r in rs.refs]))
                     for rs in ref_sets]
        check_cancel()

        # 3. + 4. targets ---------------------------------------------------------------------------------------
        grids = []
        for src in sources:
            tile_scale = 1.0
            if params.match_resolution:
                target_size = src.ground_pixel_size()
                # without ground sizes on both sides, the target is taken to share the reference's native pixels
                tile_scale = (resolution_scale(target_size, ref_pixel_size) if target_size and ref_pixel_size
                              else (1.0 if abs(scale.zoom - 1.0) < 1e-6 else 1.0 / scale.zoom))
            grids.append(TileGrid(src.width, src.height, params.tile_size, params.overlap, tile_scale))
        total_tiles = max(1, sum(len(g) for g in grids))
        done = 0

        def predict(rgb):  # one class: HxW; several: C x H x W, each tile read once and encoded once
            if len(classes) == 1:
                return cuda_safe(lambda: predictors[0].predict(rgb))
            if params.shared_adapted_pass and joint_dta.shared_pass_applies(predictors):  # one adapted pass
                return cuda_safe(lambda: joint_dta.predict_classes(predictors, rgb))
            return np.stack([cuda_safe(lambda k=k: predictors[k].predict(rgb)) for k in range(len(classes))])

        # [cluster #17] the tile loop: in this process, or on a Dask cluster given the predictor's references
        executor.start(predict, predictors[0], stage)
        notes.extend(executor.notes)
        for src, grid in zip(sources, grids):
            t0 = time.perf_counter()
            result = TargetResult(raster=src.path, crs_wkt=src.crs_wkt, tiles=len(grid))
            stitchers = []
            try:
                for _ in classes:
                    stitchers.append(ProbabilityStitcher(src.width, src.height, feather=grid.feather))
                n_valid = n_done = 0
                for tile, prob, valid in executor.tiles(src, grid, cancelled):  # prob None: all nodata, skipped
                    n_done += 1
                    if prob is not None:
                        with stage("stitch"):
                            for k, stitcher in enumerate(stitchers):
                                stitcher.add(tile.window, prob if len(classes) == 1 else prob[k], valid)
                        n_valid += 1
                    done = _tiles_before(grids, grid) + n_done
                    say(0.05 + 0.85 * done / total_tiles, f"{src.name}: tile {n_done}/{len(grid)}")
                if n_valid == 0:
                    result.skipped = "no valid pixel (all nodata)"
                else:
                    with stage("vectorize"):
                        maps = [st.finalize() for st in stitchers]
                        if len(maps) > 1 and not params.allow_overlap:
                            keep_most_probable(maps)
                        per_class = []
                        for c, prob_map, ids, min_area in zip(classes, maps, ref_ids, min_areas):
                            detections = vectorize(
                                prob_map, src.transform, crs=src.crs, threshold=params.threshold,
                                min_area=min_area * grid.scale ** 2, simplify=params.simplify * grid.scale,
                                fill_holes=params.fill_holes, is_cancelled=cancelled,
                            )
                            per_class.append(to_features(
                                detections, class_name=c.name, source=src.path, ref_id=ids, model=model_label,
                            ))
                        if len(per_class) > 1 and not params.allow_overlap:
                            cut_enclosed(per_class)
                        result.features = [f for feats in per_class for f in feats]
            finally:
                for stitcher in stitchers:
                    stitcher.close()
            result.seconds = time.perf_counter() - t0
            results.append(result)
            check_cancel()
    finally:
        if executor is not None:
            executor.close()
        for src in sources:
            src.close()

    # 5. output -----------------------------------------------------------------------------------------------
    output = None
    if params.output:
        from .writers import write_results

        say(0.95, "writing")
        with stage("write"):
            written = write_results(params.output, results, params.output_format, overwrite=params.overwrite,
                                    is_cancelled=cancelled, classes=_layer_classes(params))
            output = written[0] if written else params.output
            Path(output + ".params.json").write_text(params.to_json())
    say(1.0, "done")
    return RunResult(params=params, targets=results, output=output, seconds=time.perf_counter() - t_start,
                     timings=dict(timings), notes=notes, scale=scale_note)


def _tiles_before(grids, grid) -> int:
    n = 0
    for g in grids:
        if g is grid:
            return n
        n += len(g)
    return n


__all__ = ["run", "load_engine", "make_densifier", "default_adapters", "resolve_adapters", "Feature"]
