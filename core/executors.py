"""Who runs the tile loop: this process (:class:`LocalExecutor`) or a Dask cluster (:class:`.cluster.ClusterExecutor`).

``core.pipeline.run`` asks :func:`make_executor` for the executor of ``params.cluster`` and, per target, stitches
what ``executor.tiles(src, grid, is_cancelled)`` yields::

    executor = make_executor(params)          # a cluster is reached (and checked) here, before any work
    executor.start(predict, predictor, stage)  # after the predictor's references are set
    for tile, prob, valid in executor.tiles(src, grid, is_cancelled):
        ...                                   # prob None: an all-nodata tile (skipped); else HxW float32
    executor.close()

Both executors run the same per-tile work, :func:`tile_job` (read the window resampled to the tile's
``out_shape``, skip it when it holds no valid pixel, predict): here on the run's predictor, on a cluster on each
worker's own predictor (:mod:`.cluster_worker`).
"""

from __future__ import annotations

from typing import Callable, Iterator, Optional, Tuple

import numpy as np

from .errors import CancelledError
from .tiling import tile_job  # noqa: F401  (both executors call it)

TileOut = Tuple[object, Optional[np.ndarray], Optional[np.ndarray]]  # (Tile, prob HxW float32, valid HxW bool)


class LocalExecutor:
    """The tile loop in this process, tile after tile (what the pipeline always did)."""

    name = "this computer"

    def __init__(self) -> None:
        self.predict = None
        self.stage = None
        self.notes = []

    def start(self, predict: Callable[[np.ndarray], np.ndarray], predictor=None, stage=None) -> None:
        """``predict(rgb) -> prob``: the run's predictor (with its CUDA fallback); ``stage``: the run's timer."""
        self.predict, self.stage = predict, stage

    def tiles(self, src, grid, is_cancelled: Optional[Callable[[], bool]] = None) -> Iterator[TileOut]:
        for tile in grid:
            if is_cancelled is not None and is_cancelled():
                raise CancelledError()
            out = tile_job(src, tile, self.predict, self.stage)
            yield (tile, None, None) if out is None else (tile, out[0], out[1])

    def close(self) -> None:
        pass


def make_executor(params, progress: Optional[Callable[[float, str], None]] = None):
    """The executor of ``params.cluster``: "" -> :class:`LocalExecutor`; ``local:N`` / ``tcp://HOST:PORT`` -> a
    connected, checked :class:`.cluster.ClusterExecutor` (InputError with one sentence when it cannot be used)."""
    if not getattr(params, "cluster", ""):
        return LocalExecutor()
    from .cluster import ClusterExecutor

    return ClusterExecutor.connect(params, progress)


__all__ = ["LocalExecutor", "make_executor", "tile_job"]
