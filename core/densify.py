"""Scribbles -> masks: SAM prompted with points along a scribble (the run's and the mask preview's densifier).

Out of GPU memory the scribble is densified again on a CPU copy of the model (:mod:`core.gpu_fallback`).
"""

from __future__ import annotations

import numpy as np

from .gpu_fallback import _cpu_engine_like, _empty_cuda_cache, _is_cuda_oom


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


def _spread(points: np.ndarray, n: int) -> np.ndarray:
    points = np.asarray(points, dtype=np.float64).reshape(-1, 2)
    if len(points) <= n:
        return points
    return points[np.linspace(0, len(points) - 1, n).round().astype(int)]
