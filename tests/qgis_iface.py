"""A small QgisInterface substitute built from real QGIS widgets, for tests without the QGIS desktop.

Real QMainWindow, real QgsMapCanvas (central widget) kept in sync with the project's layer tree by a real
QgsLayerTreeMapCanvasBridge, real QgsMessageBar, real QgsLayerTreeView, a real "Plugins" toolbar and a real
"&Raster" menu whose plugin sub-menus behave like QGIS's (a sub-menu per plugin menu name, removed when its last
action goes). Only the methods the plugin uses are provided; anything else raises AttributeError, so a test
fails loudly if the plugin starts depending on more of the interface.
"""

from __future__ import annotations

from qgis.core import QgsProject, QgsRasterLayer, QgsVectorLayer
from qgis.gui import (
    QgsLayerTreeMapCanvasBridge,
    QgsLayerTreeView,
    QgsMapCanvas,
    QgsMessageBar,
)
from qgis.core import QgsLayerTreeModel
from qgis.PyQt.QtCore import QSize, Qt
from qgis.PyQt.QtWidgets import QDockWidget, QMainWindow, QMenu, QToolBar, QVBoxLayout, QWidget


class RealWidgetIface:
    def __init__(self) -> None:
        self.window = QMainWindow()
        self.window.setObjectName("QgisApp")
        self.window.resize(QSize(1200, 800))
        central = QWidget()
        layout = QVBoxLayout(central)
        layout.setContentsMargins(0, 0, 0, 0)
        self.message_bar = QgsMessageBar(central)
        self.canvas = QgsMapCanvas(central)
        self.canvas.setObjectName("theMapCanvas")
        self.canvas.setCanvasColor(Qt.white)
        self.canvas.resize(QSize(800, 600))
        layout.addWidget(self.message_bar)
        layout.addWidget(self.canvas, 1)
        self.window.setCentralWidget(central)

        self.project = QgsProject.instance()
        self.bridge = QgsLayerTreeMapCanvasBridge(self.project.layerTreeRoot(), self.canvas)
        self.layer_tree_model = QgsLayerTreeModel(self.project.layerTreeRoot())
        self.layer_tree_view = QgsLayerTreeView()
        self.layer_tree_view.setModel(self.layer_tree_model)
        layers_dock = QDockWidget("Layers", self.window)
        layers_dock.setObjectName("Layers")
        layers_dock.setWidget(self.layer_tree_view)
        self.window.addDockWidget(Qt.LeftDockWidgetArea, layers_dock)

        self.raster_menu = self.window.menuBar().addMenu("&Raster")
        self.raster_menu.setObjectName("mRasterMenu")
        self.plugin_toolbar = QToolBar("Plugins Toolbar", self.window)
        self.plugin_toolbar.setObjectName("mPluginToolBar")
        self.window.addToolBar(self.plugin_toolbar)
        self.project.layersAdded.connect(self._first_layer_extent)
        self.custom_actions = {}  # action -> {"menu", "type", "all", "layers"}: addCustomActionForLayer*

    # -- windows ------------------------------------------------------------------------------------------------
    def mainWindow(self):
        return self.window

    def mapCanvas(self):
        return self.canvas

    def messageBar(self):
        return self.message_bar

    def layerTreeView(self):
        return self.layer_tree_view

    def layerTreeCanvasBridge(self):
        return self.bridge

    def addDockWidget(self, area, dock) -> None:
        self.window.addDockWidget(area, dock)

    def removeDockWidget(self, dock) -> None:
        self.window.removeDockWidget(dock)

    # -- toolbar and menu ---------------------------------------------------------------------------------------
    def pluginToolBar(self):
        return self.plugin_toolbar

    def addToolBarIcon(self, action) -> int:
        self.plugin_toolbar.addAction(action)
        return 0

    def removeToolBarIcon(self, action) -> None:
        self.plugin_toolbar.removeAction(action)

    def rasterMenu(self):
        return self.raster_menu

    def _plugin_menu(self, name: str, create: bool):
        for action in self.raster_menu.actions():
            menu = action.menu()
            if menu is not None and menu.title() == name:
                return menu
        if not create:
            return None
        menu = QMenu(name, self.raster_menu)
        self.raster_menu.addMenu(menu)
        return menu

    def addPluginToRasterMenu(self, name: str, action) -> None:
        self._plugin_menu(name, True).addAction(action)

    def removePluginRasterMenu(self, name: str, action) -> None:
        menu = self._plugin_menu(name, False)
        if menu is None:
            return
        menu.removeAction(action)
        if not menu.actions():
            self.raster_menu.removeAction(menu.menuAction())
            menu.deleteLater()

    def raster_menu_entries(self):
        """{sub-menu title: [action texts]} of the Raster menu (for assertions)."""
        out = {}
        for action in self.raster_menu.actions():
            if action.menu() is not None:
                out[action.menu().title()] = [a.text() for a in action.menu().actions()]
        return out

    # -- layer context menu (custom actions, as QgisInterface's) --------------------------------------------------
    def addCustomActionForLayerType(self, action, menu, layer_type, all_layers) -> None:
        self.custom_actions[action] = {"menu": menu, "type": layer_type, "all": all_layers, "layers": set()}

    def addCustomActionForLayer(self, action, layer) -> None:
        if action in self.custom_actions:
            self.custom_actions[action]["layers"].add(layer.id())

    def removeCustomActionForLayerType(self, action) -> bool:
        return self.custom_actions.pop(action, None) is not None

    def layer_context_actions(self, layer):
        """The custom actions the layer tree's context menu of ``layer`` would show (for assertions)."""
        return [a for a, d in self.custom_actions.items() if d["all"] or layer.id() in d["layers"]]

    # -- layers -------------------------------------------------------------------------------------------------
    def activeLayer(self):
        return self.layer_tree_view.currentLayer()

    def setActiveLayer(self, layer) -> bool:
        self.layer_tree_view.setCurrentLayer(layer)
        return True

    def addRasterLayer(self, path: str, name: str = ""):
        layer = QgsRasterLayer(path, name or path.rsplit("/", 1)[-1].rsplit(".", 1)[0])
        if not layer.isValid():
            return None
        self.project.addMapLayer(layer)
        return layer

    def addVectorLayer(self, path: str, name: str, provider: str = "ogr"):
        layer = QgsVectorLayer(path, name, provider)
        if not layer.isValid():
            return None
        self.project.addMapLayer(layer)
        return layer

    def zoomFull(self) -> None:
        self.canvas.zoomToFullExtent()

    def _first_layer_extent(self, layers) -> None:
        # like QGIS: the first layer of an empty project sets the canvas CRS and extent
        if len(self.project.mapLayers()) == len(layers) and layers:
            self.canvas.setDestinationCrs(layers[0].crs())
            self.canvas.setExtent(layers[0].extent())
            self.canvas.refresh()


def flush_deletes(app=None) -> None:
    """Run pending deleteLater() calls now (tests have no running event loop to do it)."""
    from qgis.PyQt.QtCore import QCoreApplication, QEvent

    for _ in range(3):
        QCoreApplication.sendPostedEvents(None, QEvent.DeferredDelete)
        QCoreApplication.processEvents()


def close_dock(dock, iface, qtbot, timeout: int = 60000) -> None:
    """Tear a test's ViRefSAM dock down: cancel a run still going, shut it down, remove and delete it."""
    from qgis.core import QgsApplication

    if dock.is_running():
        dock.cancel()
        qtbot.waitUntil(lambda: not dock.is_running(), timeout=timeout)
    dock.shutdown()
    iface.removeDockWidget(dock)
    dock.setParent(None)
    dock.deleteLater()
    flush_deletes()
    QgsApplication.taskManager().cancelAll()


def set_up_run(dock, reference, marks, targets, include_reference=True, mode="training_free",
               class_name="building") -> None:
    """Point the dock at a reference raster with its marked polygons and at the targets, on the CPU with 256 px
    tiles (the small, fast run several tests need); ``mode`` None leaves the dock's mode as it is."""
    dock.class_edit.setText(class_name)
    dock.reference_combo.setLayer(reference)
    dock.references.add_marks(reference, list(marks))
    dock.include_reference_check.setChecked(include_reference)
    dock.set_targets(list(targets))
    if mode is not None:
        dock.mode_combo.setCurrentIndex(dock.mode_combo.findData(mode))
    dock.device_combo.setCurrentIndex(dock.device_combo.findData("cpu"))
    dock.tile_spin.setValue(256)
    dock.overlap_spin.setValue(32)
