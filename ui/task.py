"""One QgsTask per run: the engine runs in QGIS's task manager thread, QGIS objects stay in the main thread.

The dock builds a frozen :class:`core.params.RunParams` in the main thread (paths, CRS strings, WKT: copies, no
QGIS objects) and hands it to :class:`SegmentTask`. ``run()`` executes in a worker thread and only calls
``core.pipeline.run(params, progress, is_cancelled)``; ``finished()`` runs in the main thread and calls the
``on_finished(task)`` callback, which creates the result layers. Outcomes, read in ``on_finished``:

* ``task.result``: the :class:`core.results.RunResult` when the run succeeded;
* ``task.cancelled``: True when the user cancelled (no result; the engine removed partial files);
* ``task.error``: one sentence for the message bar (a VirefsamError, a missing package, running out of memory
  (CPU RAM, or the GPU's outside the tile loop, which falls back to the CPU by itself), or "unexpected error,
  see the log" with the traceback in ``task.details`` and in the QGIS log).
"""

from __future__ import annotations

import threading
import time
import traceback
from typing import Callable, Optional

from qgis.core import Qgis, QgsMessageLog, QgsTask
from qgis.PyQt.QtCore import pyqtSignal

from .deps import describe_import_error, guard_engine_imports

LOG_TAG = "ViRefSAM"

UNEXPECTED = (
    "ViRefSAM stopped on an unexpected error; the details are in the log (View > Panels > Log Messages, "
    "tab ViRefSAM)."
)
OUT_OF_MEMORY = "ViRefSAM ran out of memory: use a smaller tile size or a smaller model, then run again."
GPU_OUT_OF_MEMORY = (
    "The GPU ran out of memory: choose the CPU, a smaller tile size or a smaller model, then run again."
)


def is_cuda_oom(exc: BaseException) -> bool:
    """torch.cuda.OutOfMemoryError, or the RuntimeError older torch versions raise for it (torch not imported
    here: an exception from torch means torch is loaded already)."""
    import sys

    torch = sys.modules.get("torch")
    oom = getattr(getattr(torch, "cuda", None), "OutOfMemoryError", None)
    if oom is not None and isinstance(exc, oom):
        return True
    return isinstance(exc, RuntimeError) and "CUDA out of memory" in str(exc)


class SegmentTask(QgsTask):
    """Runs ``core.pipeline.run`` for one RunParams."""

    # last progress message of the engine, delivered to the main thread (queued connection)
    progressMessage = pyqtSignal(str)

    def __init__(self, params, on_finished: Optional[Callable[["SegmentTask"], None]] = None, runner=None):
        super().__init__(f"ViRefSAM: {params.class_name}", QgsTask.CanCancel)
        self.params = params
        self.on_finished = on_finished
        self._runner = runner  # for tests only: a callable replacing core.pipeline.run
        self.result = None
        self.error: Optional[str] = None
        self.details: Optional[str] = None
        self.cancelled = False
        self.message = ""
        self.started_at: Optional[float] = None
        self.worker_thread: Optional[int] = None
        self._done = False

    # -- worker thread ------------------------------------------------------------------------------------------
    def run(self) -> bool:
        self.started_at = time.time()
        self.worker_thread = threading.get_ident()
        from ..core.errors import CancelledError, VirefsamError

        try:
            runner = self._runner
            if runner is None:
                guard_engine_imports()
                from ..core import pipeline

                runner = pipeline.run
            self.result = runner(self.params, progress=self._progress, is_cancelled=self.isCanceled)
            if self.isCanceled():  # the engine finished just as the user cancelled: honour the cancel
                self.result = None
                self.cancelled = True
                return False
            return True
        except CancelledError:
            self.cancelled = True
            return False
        except VirefsamError as exc:
            self.error = str(exc)
            return False
        except ImportError as exc:
            self.error = describe_import_error(exc)
            self.details = traceback.format_exc()
            return False
        except MemoryError:
            self.error = OUT_OF_MEMORY
            return False
        except Exception as exc:  # a bug: one sentence for the user, the traceback for the log
            if is_cuda_oom(exc):  # outside the tiles (which fall back to the CPU): loading the model, ...
                self.error = GPU_OUT_OF_MEMORY
                return False
            self.error = UNEXPECTED
            self.details = traceback.format_exc()
            return False

    def _progress(self, fraction: float, message: str = "") -> None:
        try:
            value = float(fraction)
        except (TypeError, ValueError):
            return
        self.setProgress(max(0.0, min(100.0, 100.0 * value)))
        if message and message != self.message:
            self.message = message
            self.progressMessage.emit(message)

    # -- main thread --------------------------------------------------------------------------------------------
    def finished(self, ok: bool) -> None:  # noqa: D401 (QgsTask API)
        if not ok and not self.error and not self.cancelled:
            # cancelled before run() started, or terminated by the task manager
            self.cancelled = True
        if self.details:
            QgsMessageLog.logMessage(self.details, LOG_TAG, Qgis.Critical)
        self._done = True
        callback, self.on_finished = self.on_finished, None
        if callback is not None:
            callback(self)

    @property
    def done(self) -> bool:
        return self._done


class MaskPreviewTask(QgsTask):
    """The reference mask as a run will derive it, scribbles densified with SAM (model loading included), in a
    worker thread. ``on_finished(task)`` gets ``task.wkt`` / ``task.n_pixels`` / ``task.densified`` (and
    ``task.note``: the GPU ran out of memory and the CPU densified instead) or ``task.error``. ``generation`` lets the dock ignore a preview of marks that have changed since."""

    def __init__(self, spec, model, crop_size: int, generation: int, on_finished=None):
        super().__init__("ViRefSAM: reference mask preview", QgsTask.CanCancel)
        self.spec = spec
        self.model = model
        self.crop_size = crop_size
        self.generation = generation
        self.on_finished = on_finished
        self.wkt = ""
        self.n_pixels = 0
        self.densified = False
        self.note = ""
        self.error: Optional[str] = None

    def run(self) -> bool:
        from ..core.errors import VirefsamError

        try:
            guard_engine_imports()
            from ..core.densify import make_densifier
            from ..core.engines import load_engine
            from .overlay import mask_wkt

            densify = make_densifier(load_engine(self.model))
            if self.isCanceled():
                return False
            self.wkt, self.n_pixels, self.densified = mask_wkt(self.spec, densify=densify, crop_size=self.crop_size)
            self.note = getattr(densify, "note", "")
            return True
        except VirefsamError as exc:
            self.error = str(exc)
        except ImportError as exc:
            self.error = describe_import_error(exc)
        except MemoryError:
            self.error = OUT_OF_MEMORY
        except Exception as exc:  # noqa: BLE001 - a preview never takes QGIS down; the run reports properly
            if is_cuda_oom(exc):  # loading the model on the GPU (densifying itself falls back to the CPU)
                self.error = GPU_OUT_OF_MEMORY
            else:
                self.error = f"No SAM preview of the mask: {exc}"
                QgsMessageLog.logMessage(traceback.format_exc(), LOG_TAG, Qgis.Warning)
        return False

    def finished(self, ok: bool) -> None:
        callback, self.on_finished = self.on_finished, None
        if callback is not None:
            callback(self)
