"""The run's reference stage, before the targets: the classes' reference sets at one working resolution
(:func:`_class_references`), the shared embedding cache held for the reference inputs (:func:`_hold_cache`), and
the check on the references that weighs several adapters files (:func:`_weigh_adapters`) and resolves
``tune_files`` "auto" (:func:`tuning_choice`); ``core.pipeline.run`` drives them."""

from __future__ import annotations

from typing import List, Optional, Tuple

from .engines import make_predictor
from .params import RunParams


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

