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

Out of GPU memory: when CUDA runs out of memory while encoding the references or predicting a tile, the CUDA
cache is emptied and the run goes on with the same model on the CPU (the tile is predicted again there); the
run's result says so in ``RunResult.notes`` (and therefore in its summary), and the progress message too.

Several runs may go on at once in threads of one process (the QGIS task manager, Processing); they share the
cached model, which is only read, and nothing else.
"""

from __future__ import annotations

import dataclasses
import os
import tempfile
import time
from collections import OrderedDict, defaultdict
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple

import numpy as np

from .errors import CancelledError, InputError
from .engines import (adapter_candidates, check_precision, default_adapters, load_engine, make_predictor,  # noqa: F401
                      resolve_adapters, run_predictor)
from .params import RunParams
from .results import Feature, RunResult, TargetResult
from .scale import ZOOM_VIEWS, smallest_object_area

Progress = Callable[[float, str], None]
IsCancelled = Callable[[], bool]

def make_densifier(engine):
    """``densify(image, fg_points, bg_points) -> mask``: SAM prompted with points along a scribble.

    The crop's embedding is computed once and reused for every scribble on it (``SamEngine.embed`` caches it).
    Of SAM's three candidate masks the one with the highest predicted IoU is kept.

    Out of GPU memory: when CUDA runs out of memory while densifying, the CUDA cache is emptied and the scribble
    is densified again on the CPU, by a CPU engine holding the same SAM weights (copied tensor by tensor, never
    through the GPU); later scribbles stay on the CPU. ``densify.on_cpu`` then says so, and ``densify.note`` is
    the sentence for the user (:data:`DENSIFY_CPU_NOTE`). A second out-of-memory error is raised as it is.
    """
    current = [engine]

    def predict(image, points, labels):
        return current[0].predict(image, points=points, labels=labels, multimask=len(points) == 1)

    def densify(image: np.ndarray, fg_points: np.ndarray, bg_points: np.ndarray) -> np.ndarray:
        # SAM is trained with a handful of clicks: at most 8 points along the scribble, 8 background points
        fg = _spread(fg_points, 8)
        bg = _spread(bg_points, 8)
        points = np.concatenate([fg, bg]) if len(bg) else fg
        labels = np.concatenate([np.ones(len(fg)), np.zeros(len(bg))])
        try:
            masks, iou, _ = predict(image, points, labels)
        except Exception as exc:  # noqa: BLE001 - only CUDA's out-of-memory is handled here
            if densify.on_cpu or not _is_cuda_oom(exc):
                raise
            # leaving the except block drops the failed frames and the GPU tensors they hold
        else:
            return masks[int(np.argmax(iou))]
        _empty_cuda_cache()
        current[0] = _cpu_engine_like(engine)
        _empty_cuda_cache()
        densify.on_cpu, densify.note = True, DENSIFY_CPU_NOTE
        masks, iou, _ = predict(image, points, labels)
        return masks[int(np.argmax(iou))]

    densify.on_cpu, densify.note = False, ""
    return densify


DENSIFY_CPU_NOTE = (
    "The GPU ran out of memory while densifying the scribbles, so they were densified on the CPU (slower)."
)


def _cpu_engine_like(engine):
    """A CPU SamEngine (fp32, PyTorch encoder) with the SAM weights of ``engine``, copied to the CPU tensor by
    tensor: the model is not moved (other runs may share ``engine``) and nothing new is put on the GPU."""
    import copy

    import torch

    from .modeling.engine import SamEngine

    sam = engine.sam
    memo = {}
    for t in list(sam.parameters()) + list(sam.buffers()):
        cpu = t.detach().to("cpu", copy=True)
        memo[id(t)] = torch.nn.Parameter(cpu, requires_grad=False) if isinstance(t, torch.nn.Parameter) else cpu
    return SamEngine(copy.deepcopy(sam, memo), device="cpu", precision="fp32")


def _spread(points: np.ndarray, n: int) -> np.ndarray:
    points = np.asarray(points, dtype=np.float64).reshape(-1, 2)
    if len(points) <= n:
        return points
    return points[np.linspace(0, len(points) - 1, n).round().astype(int)]


def vector_writing_available() -> bool:
    """Whether GDAL's Python bindings (osgeo), which write GeoPackage and Shapefile, can be imported. A run
    without an output file needs neither them nor :mod:`.writers` (the dock's memory layers, a bare CUDA
    machine's pip environment)."""
    try:
        from osgeo import ogr  # noqa: F401
    except ImportError:
        return False
    return True


def _check_output(params: RunParams) -> None:
    """Refuse an existing output file or an unwritable folder before any work is done."""
    if not params.output:
        return
    if not vector_writing_available():
        raise InputError(f"Writing {params.output} needs GDAL's Python bindings (osgeo), which are not installed: "
                         "install them (Debian: python3-gdal) or run without an output file.")
    from .writers import layer_names, output_paths

    names = layer_names(params.targets, _layer_classes(params))
    for path in output_paths(params.output, names, params.output_format):
        if os.path.exists(path) and not params.overwrite:
            raise InputError(f"The output file {path} exists already: choose another name or allow overwriting.")
    folder = Path(params.output).resolve().parent
    if not folder.is_dir():
        raise InputError(f"The output folder {folder} does not exist: choose an existing folder.")
    try:  # os.access says yes to root on read-only places (/proc, read-only mounts): try to write instead
        fd, probe = tempfile.mkstemp(prefix=".virefsam_probe_", dir=str(folder))
        os.close(fd)
        os.remove(probe)
    except OSError:
        raise InputError(f"The output folder {folder} is not writable: choose another folder.") from None


CPU_FALLBACK_NOTE = (
    "The GPU ran out of memory, so the run went on on the CPU (slower); choose a smaller tile size or a smaller "
    "model to stay on the GPU."
)


def _is_cuda_oom(exc: BaseException) -> bool:
    """torch.cuda.OutOfMemoryError (torch >= 1.13), or the RuntimeError older versions raise for it."""
    import torch

    oom = getattr(torch.cuda, "OutOfMemoryError", None)
    if oom is not None and isinstance(exc, oom):
        return True
    return isinstance(exc, RuntimeError) and "CUDA out of memory" in str(exc)


def _empty_cuda_cache() -> None:
    import torch

    try:
        torch.cuda.empty_cache()  # a no-op when CUDA was never initialised
    except Exception:  # noqa: BLE001 - a broken driver: nothing to free
        pass


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
        from .modeling.predictor import PARTIAL_MARKS

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


def _hold_cache(predictors, size: Optional[int]) -> List[Tuple[object, int]]:
    """Let each predictor (a blend's parts too) keep at least ``size`` entries of the shared cache; returns
    (predictor, its own size) to restore. ``size`` None: nothing changed."""
    if size is None:
        return []
    held = [(q, q.cache_size) for p in predictors for q in getattr(p, "predictors", [p]) if hasattr(q, "cache_size")]
    for q, own in held:
        q.cache_size = max(own, size) if own > 0 else own
    return held


def _weigh_adapters(engine, params: RunParams, shots, candidates, cache, hold: Optional[int] = None):
    """(weights, :class:`core.choice.Check` of each, note): the candidate files weighed by the check on the
    reference crops (:mod:`core.choice`), and a note for the message bar with every candidate's check and weight.
    ``cache``: the run's embedding cache (the candidates and the run's predictors encode each reference crop once);
    ``hold``: how many of its entries each candidate keeps."""
    from .choice import weigh_checks

    weights, checks = weigh_checks(
        candidates, lambda path: make_predictor(engine, params, path, cache=cache, cache_size=hold), shots)
    told = ", ".join(f"{p.name} {c.iou:.2f}" for p, c in zip(candidates, checks))
    used = [f"{p.name} {w:.0%}" for p, w in zip(candidates, weights) if w > 0]
    what = used[0].rsplit(" ", 1)[0] + " alone" if len(used) == 1 else "a blend of " + " and ".join(used)
    return weights, checks, f"Adapters auto: {what}, by the check on the reference ({told})."


def tuning_choice(weights, checks) -> Tuple[str, str]:
    """``tune_files`` "auto" resolved by the check (:func:`core.choice.marks_complete`): ("all" or "vcp_alone",
    a note for the message bar)."""
    from .choice import beyond_marks, marks_complete

    beyond = beyond_marks(weights, checks)
    if marks_complete(weights, checks):
        return "all", (f"Tuning every adapters file on the references: the marks look complete (the adapters find "
                       f"{beyond:.2f}x the marked area beyond them).")
    return "vcp_alone", (f"Tuning only a file without DTA on the references: the marks look like a few of many (the "
                         f"adapters find {beyond:.1f}x the marked area beyond them).")


def _layer_classes(params: RunParams) -> Optional[List[str]]:
    """The class names when the output has one layer per class (``layer_per_class``), else None."""
    return [c.name for c in params.class_specs()] if params.layer_per_class else None


def _class_references(params: RunParams, classes, densify=None) -> List:
    """One :class:`core.reference.ReferenceSet` per class, all at the first class's working resolution (so that
    every class sees the same tiles)."""
    from .reference import reference_set

    kw = dict(densify=densify, crop_size=params.tile_size, bands=params.bands)
    first = reference_set(classes[0].references, params.scale, **kw)
    out = [first]
    for c in classes[1:]:
        if first.working_gsd:
            out.append(reference_set(c.references, working_gsd=first.working_gsd, **kw))
        else:  # rasters without CRS: the same zoom
            out.append(reference_set(c.references, str(first.scale.zoom), **kw))
    return out


def keep_most_probable(maps: List[np.ndarray], block_rows: int = 512) -> None:
    """Several classes' probability maps (H x W each, changed in place): where classes overlap, each pixel keeps
    only the most probable class's probability (the others get 0; ties go to the first class)."""
    h = maps[0].shape[0]
    for r in range(0, h, block_rows):
        stack = np.stack([np.asarray(m[r : r + block_rows]) for m in maps])
        best = stack.argmax(axis=0)
        for k, m in enumerate(maps):
            m[r : r + block_rows] = np.where(best == k, stack[k], 0.0).astype(m.dtype)


def cut_enclosed(per_class: List[List[Feature]]) -> None:
    """Several classes without overlap: a polygon whose filled holes hold another class's polygons gets those
    holes back (in place; ``area`` scaled to the new geometry). Only polygons of other classes whose
    representative point lies inside it and which are smaller are cut out."""
    from shapely.ops import unary_union

    flat = [(k, f) for k, feats in enumerate(per_class) for f in feats]
    geoms = [f.geometry for _, f in flat]
    if not geoms:
        return
    b = np.asarray([g.bounds for g in geoms], np.float64)  # boxes first (shapely 1.8's STRtree can crash here)
    for k, f in flat:
        g = f.geometry
        x0, y0, x1, y1 = g.bounds
        near = np.nonzero((b[:, 0] <= x1) & (b[:, 2] >= x0) & (b[:, 1] <= y1) & (b[:, 3] >= y0))[0]
        inner = [geoms[j] for j in near if flat[j][0] != k and geoms[j].area < g.area
                 and g.contains(geoms[j].representative_point())]
        if inner:
            cut = g.difference(unary_union(inner))
            if not cut.is_empty and cut.area > 0:
                f.attributes["area"] = f.attributes.get("area", 0.0) * cut.area / g.area
                f.geometry = cut


def _tiles_before(grids, grid) -> int:
    n = 0
    for g in grids:
        if g is grid:
            return n
        n += len(g)
    return n


__all__ = ["run", "load_engine", "make_densifier", "default_adapters", "resolve_adapters", "Feature"]
