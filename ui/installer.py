"""The dock's "Install dependencies": :func:`ui.pip_install.install` in a background ``QgsTask``.

The folder lives in the QGIS profile (``QgsApplication.qgisSettingsDirPath()/python/virefsam-deps/py3.X``); the
task reports pip's progress, can be cancelled (pip is killed, the folder stays without its marker and is never
used), writes ``install-py3.X.log`` next to the folder, and on success puts the folder on ``sys.path`` at once
(no QGIS restart needed). ``plugin.py`` does the same at every start.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Callable, Optional

from qgis.core import QgsApplication, QgsTask

from . import deps_folder, pip_install


def profile_deps_dir() -> Path:
    return deps_folder.deps_dir(QgsApplication.qgisSettingsDirPath())


def log_path() -> Path:
    folder = profile_deps_dir()
    return folder.parent / f"install-{folder.name}.log"


def folder_in_use(folder: Path) -> bool:
    """Whether this QGIS already imported a module from the folder (removing it then needs a restart)."""
    root = str(Path(folder).resolve())
    for mod in list(sys.modules.values()):
        f = getattr(mod, "__file__", None)
        if f and str(f).startswith(root):
            return True
    return False


def remove_folder() -> str:
    """Remove the profile's dependency folder; the sentence to show (raises InstallError with one sentence)."""
    folder = profile_deps_dir()
    in_use = folder_in_use(folder) if folder.exists() else False
    pip_install.remove(folder)
    if in_use:
        return "ViRefSAM's dependencies were removed: restart QGIS to unload the packages already in use."
    return f"ViRefSAM's dependencies were removed from {folder}."


class InstallTask(QgsTask):
    """pip into the profile's folder in the background. ``on_finished(ok, message)`` runs in the main thread."""

    def __init__(self, plan: pip_install.Plan, on_finished: Optional[Callable[[bool, str], None]] = None,
                 on_progress: Optional[Callable[[float, str], None]] = None) -> None:
        super().__init__("ViRefSAM: installing dependencies", QgsTask.CanCancel)
        self.plan = plan
        self.on_finished = on_finished
        self.on_progress = on_progress
        self.message = ""
        self.info: dict = {}
        self.step = ""
        self.progressChanged.connect(self._progress_changed)

    def _progress(self, fraction: float, message: str) -> None:
        self.step = message
        self.setProgress(100.0 * max(0.0, min(1.0, fraction)))

    def _progress_changed(self, value: float) -> None:  # main thread
        if self.on_progress is not None:
            self.on_progress(value / 100.0, self.step)

    def run(self) -> bool:  # worker thread: no widgets here
        try:
            self.info = pip_install.install(self.plan, progress=self._progress, is_cancelled=self.isCanceled)
        except pip_install.InstallError as exc:
            self.message = str(exc)
            return False
        except Exception as exc:  # noqa: BLE001 - whatever pip or the disk did: one sentence, the log has more
            self.message = (f"The install stopped on an unexpected error ({type(exc).__name__}: {exc}); the log is "
                            f"{self.plan.log_path}.")
            return False
        size = self.info.get("bytes", 0) / 1e9
        self.message = (f"ViRefSAM's dependencies are installed ({size:.1f} GB, {self.info.get('variant')} build of "
                        "torch): ViRefSAM is ready.")
        return True

    def finished(self, ok: bool) -> None:  # main thread
        if ok:
            deps_folder.activate(self.plan.folder)
        elif not self.message:
            self.message = ("The install was cancelled; the half-finished folder is not used: click Repair / "
                            "reinstall to install again.")
        if self.on_finished is not None:
            self.on_finished(ok, self.message)

    def cancel(self) -> None:
        super().cancel()


def start_install(variant: Optional[str] = None, on_finished=None, on_progress=None,
                  plan: Optional[pip_install.Plan] = None) -> InstallTask:
    """Plan (the engine's requirements, this profile) and start the task in QGIS's task manager."""
    from .deps import missing_dependencies

    if plan is None:
        plan = pip_install.make_plan(QgsApplication.qgisSettingsDirPath(), variant, missing_dependencies())
    task = InstallTask(plan, on_finished=on_finished, on_progress=on_progress)
    QgsApplication.taskManager().addTask(task)
    return task
