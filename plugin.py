"""The QGIS plugin object: a toolbar button and a Raster-menu entry that toggle the ViRefSAM dock, and the
Processing provider.

``unload()`` takes away everything ``initGui()`` added (actions, menu entry, dock, map tools, rubber bands,
provider, message-bar item), so loading and unloading repeatedly leaves QGIS as it was. A missing Python
dependency (torch, segment_anything, ...) does not stop the plugin from loading: it is reported once in the
message bar, which points to the dock's "Install dependencies" (``ui/installer.py``).

Before anything imports the engine, every plugin start (desktop, Processing, ``qgis_process``) puts the
plugin's own package folder in the QGIS profile on ``sys.path`` when its install completed
(``ui/deps_folder.py``); a half-finished folder is never used and is reported once.
"""

from __future__ import annotations

import os
import sys

from qgis.core import Qgis, QgsApplication
from qgis.PyQt.QtCore import Qt
from qgis.PyQt.QtGui import QIcon
from qgis.PyQt.QtWidgets import QAction

from .ui import deps_folder
from .ui.deps import install_message, missing_dependencies

PLUGIN_DIR = os.path.dirname(os.path.abspath(__file__))
ICON = os.path.join(PLUGIN_DIR, "resources", "icon.svg")
MENU = "&ViRefSAM"
INCOMPLETE_MESSAGE = ("A previous install of ViRefSAM's dependencies did not finish, so it is not used: open the "
                      'ViRefSAM dock and click "Repair / reinstall".')


def activate_dependencies() -> str:
    """Put the profile's complete dependency folder on sys.path (never a half-finished one); its state."""
    return deps_folder.activate(deps_folder.deps_dir(QgsApplication.qgisSettingsDirPath()))


class ViRefSamPlugin:
    def __init__(self, iface) -> None:
        self.iface = iface
        self.action = None
        self.dock = None
        self.provider = None
        self.dependency_message = None
        self.missing = []
        self.deps_state = activate_dependencies()  # before any engine import

    # -- Processing (also called alone by qgis_process) ---------------------------------------------------------
    def initProcessing(self) -> None:  # noqa: N802 (QGIS's name)
        if self.provider is None:
            from .ui.processing_provider import ViRefSamProvider

            self.provider = ViRefSamProvider()
            QgsApplication.processingRegistry().addProvider(self.provider)

    # -- GUI ----------------------------------------------------------------------------------------------------
    def initGui(self) -> None:  # noqa: N802
        self.initProcessing()
        self.action = QAction(QIcon(ICON), "ViRefSAM", self.iface.mainWindow())
        self.action.setObjectName("virefsam_toggle_dock")
        self.action.setToolTip("ViRefSAM: segment every object of a class from one marked example")
        self.action.setCheckable(True)
        self.action.toggled.connect(self.toggle_dock)
        self.iface.addToolBarIcon(self.action)
        self.iface.addPluginToRasterMenu(MENU, self.action)

        self.missing = missing_dependencies()
        if self.missing:
            bar = self.iface.messageBar()
            text = INCOMPLETE_MESSAGE if self.deps_state == deps_folder.INCOMPLETE else install_message(self.missing)
            self.dependency_message = bar.createMessage("ViRefSAM", text)
            self.dependency_message.setLevel(Qgis.Warning)
            bar.pushItem(self.dependency_message)

    def toggle_dock(self, checked: bool) -> None:
        if checked and self.dock is None:
            from .ui.dock import ViRefSamDock

            self.dock = ViRefSamDock(self.iface)
            self.iface.addDockWidget(Qt.RightDockWidgetArea, self.dock)
            self.dock.visibilityChanged.connect(self._dock_visibility_changed)
        if self.dock is not None:
            self.dock.setVisible(checked)
            if checked:
                self.dock.raise_()

    def _dock_visibility_changed(self, visible: bool) -> None:
        if self.action is not None and self.action.isChecked() != visible:
            self.action.blockSignals(True)
            self.action.setChecked(visible)
            self.action.blockSignals(False)

    def unload(self) -> None:
        if self.dock is not None:
            try:
                self.dock.visibilityChanged.disconnect(self._dock_visibility_changed)
            except (TypeError, RuntimeError):
                pass
            self.dock.shutdown()
            self.iface.removeDockWidget(self.dock)
            self.dock.setParent(None)
            self.dock.deleteLater()
            self.dock = None
        if self.action is not None:
            self.iface.removePluginRasterMenu(MENU, self.action)
            self.iface.removeToolBarIcon(self.action)
            self.action.setParent(None)
            self.action.deleteLater()
            self.action = None
        if self.dependency_message is not None:
            try:
                self.iface.messageBar().popWidget(self.dependency_message)
            except RuntimeError:  # already closed by the user (the C++ item is gone)
                pass
            self.dependency_message = None
        if self.provider is not None:
            QgsApplication.processingRegistry().removeProvider(self.provider)
            self.provider = None
        _forget_submodules()


def _forget_submodules() -> None:
    """Drop the package's submodules from sys.modules. QGIS removes the modules its import hook saw; parent
    packages reached only through ``from ..core.x import y`` (e.g. ``virefsam.core``) escape it and would make a
    reload use stale code."""
    package = __name__.rpartition(".")[0]
    if not package:
        return
    for name in [m for m in sys.modules if m.startswith(package + ".") and m != __name__]:
        sys.modules.pop(name, None)
