"""The ViRefSAM dock: mark a reference, choose targets and a model, run, get polygons.

Workflow of the analyst (issue #6):
1. type the class name, choose the reference raster;
2. mark one example: scribble on it (Shift + drag = background), draw a polygon, or take the selected features
   of a vector layer; the dense mask the engine derives from the marks is shown on the canvas at once;
   "New reference" starts another example (K-shot), on the same or another raster;
3. tick the target rasters (all open rasters by default; web layers cannot be targets);
4. Run: a QgsTask runs the engine in the background, the progress bar follows, Cancel stops it within seconds;
5. one memory layer per target appears under a group named after the class; Export writes them to a
   GeoPackage or Shapefile.
"""

from __future__ import annotations

import os
from typing import List, Optional

from qgis.core import (
    Qgis,
    QgsApplication,
    QgsMapLayerProxyModel,
    QgsProject,
    QgsRasterLayer,
    QgsRectangle,
    QgsVectorLayer,
    QgsWkbTypes,
    QgsGeometry,
)
from qgis.gui import QgsCollapsibleGroupBox, QgsDockWidget, QgsFileWidget, QgsMapLayerComboBox
from qgis.PyQt.QtCore import Qt, QTimer
from qgis.PyQt.QtGui import QIcon
from qgis.PyQt.QtWidgets import (
    QAction,
    QButtonGroup,
    QCheckBox,
    QComboBox,
    QDoubleSpinBox,
    QFileDialog,
    QFormLayout,
    QHBoxLayout,
    QLabel,
    QLineEdit,
    QListWidget,
    QListWidgetItem,
    QMenu,
    QProgressBar,
    QPushButton,
    QRadioButton,
    QScrollArea,
    QSizePolicy,
    QSpinBox,
    QToolButton,
    QVBoxLayout,
    QWidget,
)

from . import adapters as adapter_choice
from . import run_options, settings
from .deps import describe_import_error, install_message, missing_dependencies
from .map_tools import PolygonTool, ScribbleTool
from .overlay import ReferenceOverlay, mask_geometry
from .references import ReferenceSet, geometries_from_features, raster_path, web_layer_reason
from .result_layers import add_result_layers, result_layers
from .task import MaskPreviewTask, SegmentTask

TITLE = "ViRefSAM"

MODELS = (
    ("Embedded SAM (default, no download)", "embedded"),
    ("MobileSAM checkpoint (vit_t)", "vit_t"),
    ("SAM ViT-B checkpoint (vit_b)", "vit_b"),
    ("SAM ViT-L checkpoint (vit_l)", "vit_l"),
    ("SAM ViT-H checkpoint (vit_h)", "vit_h"),
)
MODES = (
    ("ViRefSAM (VCP + DTA adapters)", "virefsam"),
    ("Training-free", "training_free"),
)
DEVICES = (("Automatic (CUDA if available)", "auto"), ("CPU", "cpu"), ("CUDA GPU", "cuda"))

ICON = os.path.join(os.path.dirname(os.path.dirname(__file__)), "resources", "icon.svg")


def _choice_combo(name: str, choices, tooltip: str = "") -> QComboBox:
    """A QComboBox named ``name`` holding (label, value) ``choices``, with an optional tooltip."""
    combo = QComboBox()
    combo.setObjectName(name)
    for label, value in choices:
        combo.addItem(label, value)
    if tooltip:
        combo.setToolTip(tooltip)
    return combo


def _set_combo_data(combo: QComboBox, value) -> None:
    i = combo.findData(value)
    if i >= 0:
        combo.setCurrentIndex(i)


class ViRefSamDock(QgsDockWidget):
    def __init__(self, iface, parent=None) -> None:
        super().__init__(TITLE, parent or iface.mainWindow())
        self.setObjectName("ViRefSamDock")
        self.iface = iface
        self.canvas = iface.mapCanvas()
        self.project = QgsProject.instance()
        self.task: Optional[SegmentTask] = None
        self.last_layers: List[QgsVectorLayer] = []
        self._confirmed_output = ""
        self._loading = True
        self._syncing = False  # the mode and adapter combos are being set from each other
        self._adapters_before_none = adapter_choice.SHIPPED

        self.references = ReferenceSet(self)
        self.overlay = ReferenceOverlay(self.canvas)
        self._preview_timer = QTimer(self)
        self._preview_timer.setSingleShot(True)
        self._preview_timer.setInterval(250)
        self._preview_timer.timeout.connect(self.update_mask_preview)
        self.mask_pixels = 0
        self.mask_error = ""
        self.mask_densified = False
        self.preview_task = None
        self._preview_generation = 0
        self._preview_pending = False

        self._build_ui()
        self._make_tools()
        self._load_settings()
        self._loading = False

        self.references.changed.connect(self._references_changed)
        self.project.layersAdded.connect(self._layers_changed)
        self.project.layersRemoved.connect(self._layers_changed)
        self.project.layerWillBeRemoved.connect(self._layer_will_be_removed)
        self.refresh_targets()
        self._reference_layer_changed()
        self._references_changed()

    # ================================================================================================ UI ======
    def _build_ui(self) -> None:
        body = QWidget()
        layout = QVBoxLayout(body)
        layout.setContentsMargins(4, 4, 4, 4)

        # -- class and reference -------------------------------------------------------------------------------
        ref_box = QgsCollapsibleGroupBox("1. Class and reference")
        form = QFormLayout(ref_box)
        form.setRowWrapPolicy(QFormLayout.WrapLongRows)
        self.class_edit = QLineEdit()
        self.class_edit.setObjectName("class_name")
        self.class_edit.setPlaceholderText("e.g. building, tree, solar panel")
        form.addRow("Class name", self.class_edit)
        self.reference_combo = QgsMapLayerComboBox()
        self.reference_combo.setObjectName("reference_layer")
        self.reference_combo.setFilters(QgsMapLayerProxyModel.RasterLayer)
        self.reference_combo.setAllowEmptyLayer(True)
        form.addRow("Reference raster", self.reference_combo)

        tools = QHBoxLayout()
        self.scribble_action = QAction("Scribble", self)
        self.scribble_action.setToolTip("Drag on one example of the class. Hold Shift while dragging to mark background.")
        self.background_action = QAction("Background", self)
        self.background_action.setToolTip("Drag over things that are NOT the class (background scribble).")
        self.polygon_action = QAction("Polygon", self)
        self.polygon_action.setToolTip(
            "Click the outline of one example; right-click or Enter closes it, Backspace removes the last vertex. "
            "Shift at the first click: background polygon."
        )
        self._tool_buttons = {}
        for action, name in (
            (self.scribble_action, "scribble"),
            (self.background_action, "background"),
            (self.polygon_action, "polygon"),
        ):
            action.setCheckable(True)
            action.setObjectName(f"virefsam_{name}_action")
            button = QToolButton()
            button.setDefaultAction(action)
            button.setToolButtonStyle(Qt.ToolButtonTextOnly)
            button.setObjectName(f"{name}_button")
            tools.addWidget(button)
            self._tool_buttons[name] = button
        tools.addStretch(1)
        form.addRow("Mark", tools)

        self.vector_combo = QgsMapLayerComboBox()
        self.vector_combo.setObjectName("vector_layer")
        self.vector_combo.setFilters(QgsMapLayerProxyModel.PolygonLayer | QgsMapLayerProxyModel.LineLayer)
        self.vector_combo.setAllowEmptyLayer(True)
        self.vector_combo.setToolTip("A polygon or line layer whose selected features mark examples of the class.")
        form.addRow("Features of", self.vector_combo)
        sel = QHBoxLayout()
        self.add_selected_button = QPushButton("Use selected features")
        self.add_selected_button.setToolTip("Add the selected features of this layer as marks (polygons or lines).")
        self.selected_background = QCheckBox("as background")
        sel.addWidget(self.add_selected_button)
        sel.addWidget(self.selected_background)
        sel.addStretch(1)
        form.addRow("", sel)

        self.reference_list = QListWidget()
        self.reference_list.setObjectName("references")
        self.reference_list.setMaximumHeight(80)
        form.addRow("References", self.reference_list)
        ref_buttons = QHBoxLayout()
        self.new_reference_button = QPushButton("New")
        self.new_reference_button.setToolTip("Start another example of the same class (K-shot).")
        self.remove_reference_button = QPushButton("Remove")
        self.undo_button = QPushButton("Undo")
        self.clear_button = QPushButton("Clear")
        self.clear_button.setToolTip("Remove every mark of the current reference (can be undone).")
        for b in (self.new_reference_button, self.remove_reference_button, self.undo_button, self.clear_button):
            b.setSizePolicy(QSizePolicy.Ignored, QSizePolicy.Fixed)  # share the row, never widen the dock
            b.setMinimumWidth(40)
            ref_buttons.addWidget(b)
        form.addRow("", ref_buttons)
        self.show_mask_check = QCheckBox("Show the reference mask")
        self.show_mask_check.setToolTip("Draw the dense mask the engine derives from the marks (yellow).")
        self.show_mask_check.setChecked(True)
        form.addRow("", self.show_mask_check)
        self.reference_status = QLabel()
        self.reference_status.setWordWrap(True)
        form.addRow("", self.reference_status)
        layout.addWidget(ref_box)

        # -- targets ---------------------------------------------------------------------------------------------
        target_box = QgsCollapsibleGroupBox("2. Target rasters")
        tl = QVBoxLayout(target_box)
        self.target_list = QListWidget()
        self.target_list.setObjectName("targets")
        self.target_list.setMaximumHeight(110)
        tl.addWidget(self.target_list)
        trow = QHBoxLayout()
        self.include_reference_check = QCheckBox("Include the reference raster")
        self.all_targets_button = QPushButton("All")
        self.no_targets_button = QPushButton("None")
        for b in (self.all_targets_button, self.no_targets_button):
            b.setSizePolicy(QSizePolicy.Ignored, QSizePolicy.Fixed)
            b.setMinimumWidth(36)
            b.setMaximumWidth(70)
        trow.addWidget(self.include_reference_check, 1)
        trow.addWidget(self.all_targets_button, 1)
        trow.addWidget(self.no_targets_button, 1)
        tl.addLayout(trow)
        layout.addWidget(target_box)

        # -- model -----------------------------------------------------------------------------------------------
        model_box = QgsCollapsibleGroupBox("3. Model")
        mf = QFormLayout(model_box)
        mf.setRowWrapPolicy(QFormLayout.WrapLongRows)
        self.model_combo = _choice_combo("model", MODELS)
        mf.addRow("Model", self.model_combo)
        self.checkpoint_widget = QgsFileWidget()
        self.checkpoint_widget.setObjectName("checkpoint")
        self.checkpoint_widget.setFilter("PyTorch checkpoint (*.pth *.pt);;All files (*)")
        self.checkpoint_widget.setDialogTitle("SAM checkpoint")
        mf.addRow("Checkpoint", self.checkpoint_widget)
        self.mode_combo = _choice_combo("mode", MODES)
        mf.addRow("Mode", self.mode_combo)
        self.adapters_combo = _choice_combo("adapters", adapter_choice.CHOICES, adapter_choice.TOOLTIP)
        mf.addRow("Adapters", self.adapters_combo)
        self.adapters_file_widget = QgsFileWidget()
        self.adapters_file_widget.setObjectName("adapters_file")
        self.adapters_file_widget.setFilter("ViRefSAM adapter weights (*.pt);;All files (*)")
        self.adapters_file_widget.setDialogTitle("ViRefSAM adapter weights")
        self.adapters_file_widget.setToolTip("A .pt file of VCP + DTA adapters written by 'python -m core train'.")
        mf.addRow("Adapters file", self.adapters_file_widget)
        self.adapters_status = QLabel()
        self.adapters_status.setObjectName("adapters_status")
        self.adapters_status.setWordWrap(True)
        mf.addRow("", self.adapters_status)
        self.device_combo = _choice_combo("device", DEVICES)
        mf.addRow("Device", self.device_combo)
        self.precision_combo = _choice_combo("precision", run_options.PRECISIONS, run_options.PRECISION_TOOLTIP)
        mf.addRow("Precision", self.precision_combo)
        self.decoding_combo = _choice_combo("decoding", run_options.DECODINGS, run_options.DECODING_TOOLTIP)
        mf.addRow("Decoding", self.decoding_combo)
        layout.addWidget(model_box)

        opt_box = QgsCollapsibleGroupBox("Options")
        opt_box.setCollapsed(True)
        of = QFormLayout(opt_box)
        of.setRowWrapPolicy(QFormLayout.WrapLongRows)
        self.tile_spin = QSpinBox()
        self.tile_spin.setRange(64, 8192)
        self.tile_spin.setSingleStep(128)
        self.tile_spin.setSuffix(" px")
        of.addRow("Tile size", self.tile_spin)
        self.overlap_spin = QSpinBox()
        self.overlap_spin.setRange(0, 4095)
        self.overlap_spin.setSingleStep(16)
        self.overlap_spin.setSuffix(" px")
        of.addRow("Overlap", self.overlap_spin)
        self.threshold_spin = QDoubleSpinBox()
        self.threshold_spin.setRange(0.01, 0.99)
        self.threshold_spin.setSingleStep(0.05)
        self.threshold_spin.setDecimals(2)
        of.addRow("Threshold", self.threshold_spin)
        self.min_area_spin = QDoubleSpinBox()
        self.min_area_spin.setRange(0, 1e9)
        self.min_area_spin.setDecimals(1)
        self.min_area_spin.setSuffix(" px²")
        of.addRow("Minimum area", self.min_area_spin)
        self.simplify_spin = QDoubleSpinBox()
        self.simplify_spin.setRange(0, 100)
        self.simplify_spin.setDecimals(2)
        self.simplify_spin.setSuffix(" px")
        of.addRow("Simplification", self.simplify_spin)
        from . import run_on  # [cluster #17] hook: "Run on: this computer / Dask cluster at" (ui/run_on.py)
        self.run_on = run_on.add_to_form(of)
        layout.addWidget(opt_box)

        # -- output ----------------------------------------------------------------------------------------------
        out_box = QgsCollapsibleGroupBox("4. Output")
        ol = QFormLayout(out_box)
        ol.setRowWrapPolicy(QFormLayout.WrapLongRows)
        self.memory_radio = QRadioButton("Temporary layers")
        self.file_radio = QRadioButton("File")
        group = QButtonGroup(out_box)
        group.addButton(self.memory_radio)
        group.addButton(self.file_radio)
        self.memory_radio.setChecked(True)
        orow = QHBoxLayout()
        orow.addWidget(self.memory_radio)
        orow.addWidget(self.file_radio)
        orow.addStretch(1)
        ol.addRow("Results as", orow)
        self.output_widget = QgsFileWidget()
        self.output_widget.setObjectName("output")
        self.output_widget.setStorageMode(QgsFileWidget.SaveFile)
        self.output_widget.setFilter("GeoPackage (*.gpkg);;ESRI Shapefile (*.shp)")
        self.output_widget.setConfirmOverwrite(True)
        ol.addRow("File", self.output_widget)
        layout.addWidget(out_box)
        layout.addStretch(1)
        for combo in (self.model_combo, self.mode_combo, self.adapters_combo, self.device_combo,
                      self.precision_combo, self.decoding_combo):
            combo.setSizeAdjustPolicy(QComboBox.AdjustToMinimumContentsLengthWithIcon)
            combo.setMinimumContentsLength(12)

        scroll = QScrollArea()
        scroll.setWidgetResizable(True)
        scroll.setHorizontalScrollBarPolicy(Qt.ScrollBarAlwaysOff)
        self.setMinimumWidth(330)
        scroll.setWidget(body)

        # -- run row ---------------------------------------------------------------------------------------------
        outer = QWidget()
        ov = QVBoxLayout(outer)
        ov.setContentsMargins(0, 0, 0, 0)
        ov.addWidget(scroll, 1)
        self.progress = QProgressBar()
        self.progress.setRange(0, 100)
        self.progress.setValue(0)
        self.progress.setTextVisible(True)
        ov.addWidget(self.progress)
        self.status_label = QLabel("Mark one example of the class on the reference raster, then Run.")
        self.status_label.setWordWrap(True)
        ov.addWidget(self.status_label)
        run_row = QHBoxLayout()
        self.run_button = QPushButton(QIcon(ICON), "Run")
        self.run_button.setObjectName("run")
        self.cancel_button = QPushButton("Cancel")
        self.cancel_button.setObjectName("cancel")
        self.cancel_button.setEnabled(False)
        self.export_button = QPushButton("Export...")
        self.export_button.setObjectName("export")
        export_menu = QMenu(self.export_button)
        self.export_last_action = export_menu.addAction("Export the last run's layers...")
        self.export_selected_action = export_menu.addAction("Export the selected result layer...")
        self.export_all_action = export_menu.addAction("Export all result layers...")
        self.export_button.setMenu(export_menu)
        run_row.addWidget(self.run_button, 2)
        run_row.addWidget(self.cancel_button, 1)
        run_row.addWidget(self.export_button, 1)
        ov.addLayout(run_row)
        self.setWidget(outer)

        # -- connections -----------------------------------------------------------------------------------------
        self.reference_combo.layerChanged.connect(self._reference_layer_changed)
        self.add_selected_button.clicked.connect(self.add_selected_features)
        self.new_reference_button.clicked.connect(self.references.new_reference)
        self.remove_reference_button.clicked.connect(self.references.remove_current)
        self.undo_button.clicked.connect(self.references.undo)
        self.clear_button.clicked.connect(self.references.clear_current)
        self.reference_list.currentRowChanged.connect(self._reference_row_changed)
        self.show_mask_check.toggled.connect(self._schedule_preview)
        self.include_reference_check.toggled.connect(self._include_reference_toggled)
        self.all_targets_button.clicked.connect(lambda: self._check_all_targets(True))
        self.no_targets_button.clicked.connect(lambda: self._check_all_targets(False))
        self.model_combo.currentIndexChanged.connect(self._model_changed)
        self.mode_combo.currentIndexChanged.connect(self._mode_changed)
        self.adapters_combo.currentIndexChanged.connect(self._adapters_changed)
        self.adapters_file_widget.fileChanged.connect(self._update_adapters_widgets)
        self.file_radio.toggled.connect(self._output_mode_changed)
        self.output_widget.fileChanged.connect(self._output_changed)
        self.run_button.clicked.connect(self.run)
        self.cancel_button.clicked.connect(self.cancel)
        self.export_last_action.triggered.connect(lambda: self.export_dialog("last"))
        self.export_selected_action.triggered.connect(lambda: self.export_dialog("selected"))
        self.export_all_action.triggered.connect(lambda: self.export_dialog("all"))
        for w in (self.class_edit,):
            w.editingFinished.connect(self.save_settings)
        for w in (self.model_combo, self.mode_combo, self.adapters_combo, self.device_combo, self.precision_combo,
                  self.decoding_combo):
            w.currentIndexChanged.connect(self.save_settings)
        for w in (self.tile_spin, self.overlap_spin, self.threshold_spin, self.min_area_spin, self.simplify_spin):
            w.valueChanged.connect(self.save_settings)
        self.checkpoint_widget.fileChanged.connect(self.save_settings)
        self.adapters_file_widget.fileChanged.connect(self.save_settings)
        self.include_reference_check.toggled.connect(self.save_settings)
        self.file_radio.toggled.connect(self.save_settings)

    def _make_tools(self) -> None:
        self.scribble_tool = ScribbleTool(self.canvas)
        self.background_tool = ScribbleTool(self.canvas, background=True)
        self.polygon_tool = PolygonTool(self.canvas)
        self.tools = {
            self.scribble_action: self.scribble_tool,
            self.background_action: self.background_tool,
            self.polygon_action: self.polygon_tool,
        }
        for action, tool in self.tools.items():
            tool.setAction(action)  # QGIS checks / unchecks the action as the tool is (de)activated
            tool.geometryDrawn.connect(self._geometry_drawn)
            tool.message.connect(self._set_reference_status)
            action.triggered.connect(lambda checked, t=tool: self._tool_triggered(t, checked))

    # ========================================================================================== settings ======
    def _load_settings(self) -> None:
        self.class_edit.setText(settings.get("class_name"))
        _set_combo_data(self.model_combo, settings.get("model"))
        self.checkpoint_widget.setFilePath(settings.get("checkpoint"))
        self.adapters_file_widget.setFilePath(settings.get("adapters_file"))
        _set_combo_data(self.adapters_combo, settings.get("adapters"))  # before the mode: the mode has the last word
        _set_combo_data(self.mode_combo, settings.get("mode"))
        _set_combo_data(self.device_combo, settings.get("device"))
        _set_combo_data(self.precision_combo, settings.get("precision"))
        _set_combo_data(self.decoding_combo, settings.get("decoding"))
        self.tile_spin.setValue(settings.get("tile_size"))
        self.overlap_spin.setValue(settings.get("overlap"))
        self.threshold_spin.setValue(settings.get("threshold"))
        self.min_area_spin.setValue(settings.get("min_area"))
        self.simplify_spin.setValue(settings.get("simplify"))
        self.file_radio.setChecked(settings.get("output_to_file"))
        self.memory_radio.setChecked(not settings.get("output_to_file"))
        self.output_widget.setFilePath(settings.get("output_path"))
        self.include_reference_check.setChecked(settings.get("include_reference"))
        self._model_changed()
        self._output_mode_changed()

    def save_settings(self, *args) -> None:
        if self._loading:
            return
        settings.set("class_name", self.class_edit.text().strip())
        settings.set("model", self.model_combo.currentData())
        settings.set("checkpoint", self.checkpoint_widget.filePath())
        settings.set("mode", self.mode_combo.currentData())
        settings.set("adapters", self.adapters_combo.currentData())
        settings.set("adapters_file", self.adapters_file_widget.filePath())
        settings.set("device", self.device_combo.currentData())
        settings.set("precision", self.precision_combo.currentData())
        settings.set("decoding", self.decoding_combo.currentData())
        settings.set("tile_size", self.tile_spin.value())
        settings.set("overlap", self.overlap_spin.value())
        settings.set("threshold", self.threshold_spin.value())
        settings.set("min_area", self.min_area_spin.value())
        settings.set("simplify", self.simplify_spin.value())
        settings.set("output_to_file", self.file_radio.isChecked())
        settings.set("output_path", self.output_widget.filePath())
        settings.set("include_reference", self.include_reference_check.isChecked())

    def _model_changed(self, *args) -> None:
        self.checkpoint_widget.setEnabled(self.model_combo.currentData() != "embedded")
        self._update_adapters_widgets()

    # The mode and the adapters are two views of one choice: "None (training-free)" <-> mode Training-free;
    # Shipped or File <-> mode ViRefSAM. Changing one sets the other; going back to ViRefSAM restores the adapters
    # chosen before.
    def _mode_changed(self, *args) -> None:
        if self._syncing:
            return
        self._syncing = True
        try:
            choice = self.adapters_combo.currentData()
            if self.mode_combo.currentData() == "training_free":
                if choice != adapter_choice.NONE:
                    self._adapters_before_none = choice
                    _set_combo_data(self.adapters_combo, adapter_choice.NONE)
            elif choice == adapter_choice.NONE:
                _set_combo_data(self.adapters_combo, self._adapters_before_none)
        finally:
            self._syncing = False
        self._update_adapters_widgets()

    def _adapters_changed(self, *args) -> None:
        if not self._syncing:
            self._syncing = True
            try:
                none = self.adapters_combo.currentData() == adapter_choice.NONE
                _set_combo_data(self.mode_combo, "training_free" if none else "virefsam")
            finally:
                self._syncing = False
        self._update_adapters_widgets()

    def _update_adapters_widgets(self, *args) -> None:
        choice = self.adapters_combo.currentData()
        self.adapters_file_widget.setEnabled(choice == adapter_choice.FILE)
        # the decoding only matters when the run is training-free (which "Shipped" is while none are shipped)
        self.decoding_combo.setEnabled(adapter_choice.runs_training_free(choice, self.model_combo.currentData()))
        self.adapters_status.setText(adapter_choice.describe_choice(
            choice, self.model_combo.currentData(), self.adapters_file_widget.filePath()))

    def _output_mode_changed(self, *args) -> None:
        self.output_widget.setEnabled(self.file_radio.isChecked())

    def _output_changed(self, path: str) -> None:
        # a path picked in the file dialog was confirmed there (setConfirmOverwrite)
        self._confirmed_output = path if path and os.path.exists(path) else ""
        self.save_settings()

    # ======================================================================================== references ======
    def reference_layer(self) -> Optional[QgsRasterLayer]:
        layer = self.reference_combo.currentLayer()
        return layer if isinstance(layer, QgsRasterLayer) else None

    def _reference_layer_changed(self, *args) -> None:
        layer = self.reference_layer()
        crs = layer.crs() if layer is not None else None
        for tool in self.tools.values():
            tool.set_target_crs(crs)
        if layer is not None and web_layer_reason(layer):
            self._set_reference_status(web_layer_reason(layer))
        self._sync_reference_targets()

    def _tool_triggered(self, tool, checked: bool) -> None:
        if checked:
            if self.reference_layer() is None:
                self._set_reference_status("Choose the reference raster first.")
            self.canvas.setMapTool(tool)
        elif self.canvas.mapTool() is tool:
            self.canvas.unsetMapTool(tool)

    def activate_tool(self, name: str) -> None:
        """Activate ``scribble``, ``background`` or ``polygon`` (as a click on its button does)."""
        action = {"scribble": self.scribble_action, "background": self.background_action, "polygon": self.polygon_action}[name]
        action.setChecked(True)
        self._tool_triggered(self.tools[action], True)

    def _geometry_drawn(self, geometry, background: bool) -> None:
        layer = self.reference_layer()
        if layer is None:
            self._set_reference_status("Choose the reference raster first; the mark was not kept.")
            return
        reason = web_layer_reason(layer)
        if reason:
            self._set_reference_status(reason)
            return
        if not geometry.intersects(QgsRectangle(layer.extent())):
            self._set_reference_status(
                f"The mark lies outside '{layer.name()}': draw it on the reference raster (it was not kept)."
            )
            return
        self.references.add_marks(layer, [geometry], background)

    def add_selected_features(self) -> int:
        """Take the selected features of the chosen vector layer as marks of the current reference."""
        layer = self.reference_layer()
        vector = self.vector_combo.currentLayer()
        if layer is None:
            self._set_reference_status("Choose the reference raster first.")
            return 0
        if not isinstance(vector, QgsVectorLayer):
            self._set_reference_status("Choose a polygon or line layer whose selected features mark the class.")
            return 0
        features = list(vector.getSelectedFeatures())
        if not features:
            self._set_reference_status(f"No feature of '{vector.name()}' is selected: select some first.")
            return 0
        geometries, skipped = geometries_from_features(features, vector.crs(), layer)
        extent = layer.extent()
        inside = [g for g in geometries if g.intersects(extent)]
        outside = len(geometries) - len(inside)
        n = self.references.add_marks(layer, inside, self.selected_background.isChecked())
        note = f"Added {n} feature(s) of '{vector.name()}'."
        if outside:
            note += f" {outside} lie outside '{layer.name()}' and were left out."
        if skipped:
            note += f" {skipped} were not polygons or lines."
        self._set_reference_status(note)
        return n

    def _reference_row_changed(self, row: int) -> None:
        if row >= 0:
            self.references.set_current(row)

    def _references_changed(self) -> None:
        self.reference_list.blockSignals(True)
        self.reference_list.clear()
        for ref in self.references.references:
            self.reference_list.addItem(ref.describe())
        self.reference_list.setCurrentRow(self.references.current)
        self.reference_list.blockSignals(False)
        self.undo_button.setEnabled(self.references.can_undo())
        self.overlay.show_references(self.references.references, self.references.current)
        n = len(self.references.non_empty())
        self._set_reference_status(
            f"{n} reference(s) ready." if n else "Mark one example of the class: scribble on it or draw its outline."
        )
        self._sync_reference_targets()
        self._schedule_preview()

    def _schedule_preview(self, *args) -> None:
        self._preview_timer.start()

    def update_mask_preview(self) -> None:
        """Show the dense mask of the current reference, as the engine derives it (``build_reference``).

        At once: polygons as drawn, scribbles buffered by a few pixels. Then, for scribbles, a MaskPreviewTask
        densifies them with SAM in the background, as the run will, and replaces the quick preview."""
        self.mask_pixels = 0
        self.mask_error = ""
        self.mask_densified = False
        self._preview_generation += 1
        ref = self.references.current_reference
        if not self.show_mask_check.isChecked() or not ref.foreground:
            self.overlay.clear_mask()
            return
        try:
            geometry, self.mask_pixels = mask_geometry(ref.to_spec(), crop_size=self.tile_spin.value())
        except ImportError as exc:
            self.mask_error = describe_import_error(exc)
            self.overlay.clear_mask()
            self._set_reference_status(self.mask_error)
            return
        except Exception as exc:  # noqa: BLE001 - VirefsamError: one sentence; anything else: say it briefly
            from ..core.errors import VirefsamError

            self.mask_error = str(exc) if isinstance(exc, VirefsamError) else f"No mask preview: {exc}"
            self.overlay.clear_mask()
            self._set_reference_status(self.mask_error)
            return
        self.overlay.show_mask(geometry, ref.crs)
        if any(g.type() == QgsWkbTypes.LineGeometry for g in ref.foreground):
            self._start_sam_preview(ref)

    def _start_sam_preview(self, ref) -> None:
        if self.preview_task is not None:  # one at a time; a stale result is ignored and a new one started
            self._preview_pending = True
            return
        if missing_dependencies():
            return
        name = self.model_combo.currentData()
        checkpoint = self.checkpoint_widget.filePath().strip() or None
        if name != "embedded" and not checkpoint:
            return
        from ..core.params import ModelParams

        model = ModelParams(name=name, checkpoint=checkpoint if name != "embedded" else None,
                            device=self.device_combo.currentData(), precision=self.precision_combo.currentData())
        self._preview_pending = False
        task = MaskPreviewTask(ref.to_spec(), model, self.tile_spin.value(), self._preview_generation,
                               on_finished=self._sam_preview_finished)
        self.preview_task = task
        self._set_reference_status("Densifying the scribbles with SAM for the mask preview...")
        QgsApplication.taskManager().addTask(task)

    def _sam_preview_finished(self, task) -> None:
        self.preview_task = None
        if task.generation != self._preview_generation or self._preview_pending:
            self._preview_pending = False
            if self.show_mask_check.isChecked():
                self._schedule_preview()
            return
        ref = self.references.current_reference
        if task.error:
            self._set_reference_status(task.error)
            return
        if task.wkt:
            self.mask_pixels = task.n_pixels
            self.mask_densified = task.densified
            self.overlay.show_mask(QgsGeometry.fromWkt(task.wkt), ref.crs)
            text = (f"{len(self.references.non_empty())} reference(s) ready; the yellow mask is what the model will "
                    "see" + (" (scribbles densified by SAM)." if task.densified else "."))
            self._set_reference_status(f"{text} {task.note}" if task.note else text)

    def _set_reference_status(self, text: str) -> None:
        self.reference_status.setText(text)

    # =========================================================================================== targets ======
    def _layers_changed(self, *args) -> None:
        self.refresh_targets()

    def _layer_will_be_removed(self, layer_id: str) -> None:
        self.references.forget_layer(layer_id)

    def refresh_targets(self) -> None:
        """One checkable item per raster layer of the project; new layers are checked, web layers disabled."""
        previous = {}
        for i in range(self.target_list.count()):
            item = self.target_list.item(i)
            previous[item.data(Qt.UserRole)] = item.checkState()
        self.target_list.clear()
        ref_ids = self._reference_layer_ids()
        for layer in self._project_rasters():
            item = QListWidgetItem(layer.name())
            item.setData(Qt.UserRole, layer.id())
            reason = web_layer_reason(layer)
            if reason:
                item.setFlags(item.flags() & ~Qt.ItemIsEnabled & ~Qt.ItemIsUserCheckable)
                item.setToolTip(reason)
                item.setText(f"{layer.name()} (web layer: cannot be a target)")
            else:
                item.setFlags(item.flags() | Qt.ItemIsUserCheckable)
                default = Qt.Checked
                if layer.id() in ref_ids and not self.include_reference_check.isChecked():
                    default = Qt.Unchecked
                item.setCheckState(previous.get(layer.id(), default))
                item.setToolTip(raster_path(layer) or layer.source())
            self.target_list.addItem(item)

    def _project_rasters(self) -> List[QgsRasterLayer]:
        """Raster layers in layer-tree order, then any not (yet) in the tree (layersAdded comes first)."""
        ordered = [n.layer() for n in self.project.layerTreeRoot().findLayers()]
        seen = {lay.id() for lay in ordered if lay is not None}
        ordered += [lay for lid, lay in self.project.mapLayers().items() if lid not in seen]
        return [lay for lay in ordered if isinstance(lay, QgsRasterLayer)]

    def _reference_layer_ids(self) -> set:
        ids = {r.layer_id for r in self.references.references if r.layer_id}
        layer = self.reference_layer()
        if layer is not None:
            ids.add(layer.id())
        return ids

    def _sync_reference_targets(self) -> None:
        if not hasattr(self, "target_list"):
            return
        ref_ids = self._reference_layer_ids()
        state = Qt.Checked if self.include_reference_check.isChecked() else Qt.Unchecked
        for i in range(self.target_list.count()):
            item = self.target_list.item(i)
            if item.data(Qt.UserRole) in ref_ids and item.flags() & Qt.ItemIsUserCheckable:
                item.setCheckState(state)

    def _include_reference_toggled(self, checked: bool) -> None:
        self._sync_reference_targets()

    def _check_all_targets(self, checked: bool) -> None:
        for i in range(self.target_list.count()):
            item = self.target_list.item(i)
            if item.flags() & Qt.ItemIsUserCheckable:
                item.setCheckState(Qt.Checked if checked else Qt.Unchecked)

    def set_targets(self, layers) -> None:
        """Check exactly these layers (tests, scripts)."""
        ids = {lay.id() for lay in layers}
        for i in range(self.target_list.count()):
            item = self.target_list.item(i)
            if item.flags() & Qt.ItemIsUserCheckable:
                item.setCheckState(Qt.Checked if item.data(Qt.UserRole) in ids else Qt.Unchecked)

    def target_layers(self) -> List[QgsRasterLayer]:
        out = []
        for i in range(self.target_list.count()):
            item = self.target_list.item(i)
            if item.checkState() == Qt.Checked and item.flags() & Qt.ItemIsEnabled:
                layer = self.project.mapLayer(item.data(Qt.UserRole))
                if isinstance(layer, QgsRasterLayer):
                    out.append(layer)
        return out

    # =============================================================================================== run ======
    def build_params(self):
        """The frozen RunParams of the dock's current state (main thread; plain strings and numbers only)."""
        from ..core.errors import InputError
        from ..core.params import ModelParams, RunParams

        class_name = self.class_edit.text().strip()
        if not class_name:
            raise InputError("Type the name of the class first (e.g. building).")
        refs = self.references.non_empty()
        if not refs:
            raise InputError("No reference yet: mark one example of the class with a scribble or a polygon.")
        for ref in refs:
            if self.project.mapLayer(ref.layer_id) is None:
                raise InputError(f"The raster of {ref.ref_id} was removed from the project: remove that reference.")
        targets = []
        for layer in self.target_layers():
            path = raster_path(layer)
            if path is None:
                raise InputError(web_layer_reason(layer) or f"'{layer.name()}' cannot be read as a raster file.")
            targets.append(path)
        if not targets:
            raise InputError("No target raster is ticked: tick at least one raster to search.")
        name = self.model_combo.currentData()
        checkpoint = self.checkpoint_widget.filePath().strip() or None
        if name != "embedded" and not checkpoint:
            raise InputError(f"Choose the checkpoint file of {name}, or use the embedded model.")
        choice = self.adapters_combo.currentData()
        if self.mode_combo.currentData() == "training_free":
            choice = adapter_choice.NONE
        mode, adapters = adapter_choice.mode_and_adapters(choice, self.adapters_file_widget.filePath())
        model = ModelParams(
            name=name,
            checkpoint=checkpoint if name != "embedded" else None,
            adapters=adapters,
            device=self.device_combo.currentData(),
            precision=self.precision_combo.currentData(),
        )
        output, fmt, overwrite = None, "gpkg", False
        if self.file_radio.isChecked():
            output = self.output_widget.filePath().strip()
            if not output:
                raise InputError("Choose the output file (GeoPackage or Shapefile), or use temporary layers.")
            ext = os.path.splitext(output)[1].lower()
            if ext not in (".gpkg", ".shp"):
                output += ".gpkg"
                ext = ".gpkg"
            fmt = "shp" if ext == ".shp" else "gpkg"
            overwrite = bool(self._confirmed_output) and os.path.abspath(self._confirmed_output) == os.path.abspath(output)
        return RunParams(
            class_name=class_name,
            references=tuple(r.to_spec() for r in refs),
            targets=tuple(dict.fromkeys(targets)),
            output=output,
            output_format=fmt,
            overwrite=overwrite,
            model=model,
            mode=mode,
            decoding=self.decoding_combo.currentData(),
            tile_size=self.tile_spin.value(),
            overlap=self.overlap_spin.value(),
            threshold=self.threshold_spin.value(),
            min_area=self.min_area_spin.value(),
            simplify=self.simplify_spin.value(),
            cluster=self.run_on.cluster(),  # [cluster #17] hook: "" = this computer (ui/run_on.py)
        )

    def is_running(self) -> bool:
        return self.task is not None

    def run(self, runner=None) -> Optional[SegmentTask]:
        """Start a run in a QgsTask (``runner`` replaces core.pipeline.run in tests). Returns the task."""
        from ..core.errors import VirefsamError

        bar = self.iface.messageBar()
        if self.is_running():
            bar.pushMessage(TITLE, "A run is already going on: wait for it to finish or cancel it first.", Qgis.Warning, 5)
            return None
        if runner is None:
            missing = missing_dependencies()
            if missing:
                bar.pushMessage(TITLE, install_message(missing), Qgis.Warning, 0)
                return None
        try:
            params = self.build_params()
        except VirefsamError as exc:
            bar.pushMessage(TITLE, str(exc), Qgis.Warning, 8)
            return None
        self.save_settings()
        task = SegmentTask(params, on_finished=self._task_finished, runner=runner)
        task.progressChanged.connect(self._task_progress)
        task.progressMessage.connect(self.status_label.setText)
        self.task = task
        self.run_button.setEnabled(False)
        self.cancel_button.setEnabled(True)
        self.progress.setValue(0)
        self.status_label.setText(f"Running '{params.class_name}' on {len(params.targets)} raster(s)...")
        QgsApplication.taskManager().addTask(task)
        return task

    def _task_progress(self, value: float) -> None:
        self.progress.setValue(int(round(value)))

    def cancel(self) -> None:
        if self.task is not None:
            self.status_label.setText("Cancelling...")
            self.cancel_button.setEnabled(False)
            self.task.cancel()

    def _task_finished(self, task: SegmentTask) -> None:
        self.task = None
        self.run_button.setEnabled(True)
        self.cancel_button.setEnabled(False)
        bar = self.iface.messageBar()
        if task.cancelled:
            self.progress.setValue(0)
            self.status_label.setText("Cancelled: no layer was added.")
            bar.pushMessage(TITLE, "The run was cancelled; no result layer was added.", Qgis.Info, 5)
            return
        if task.error:
            self.progress.setValue(0)
            self.status_label.setText(task.error)
            bar.pushMessage(TITLE, task.error, Qgis.Critical, 0)
            return
        result = task.result
        self.progress.setValue(100)
        self.last_layers = add_result_layers(result)
        text = f"{result.summary()} {adapter_choice.describe_run(result.params)}"
        if result.output:
            text += f" Written to {result.output}."
        skipped = [t for t in result.targets if t.skipped]
        if skipped:
            text += " Skipped: " + "; ".join(f"{os.path.basename(t.raster)} ({t.skipped})" for t in skipped) + "."
        self.status_label.setText(text)
        bar.pushMessage(TITLE, text, Qgis.Success, 10)

    # ============================================================================================ export ======
    def layers_to_export(self, which: str) -> List[QgsVectorLayer]:
        if which == "last":
            return [lay for lay in self.last_layers if _alive(lay)]
        if which == "selected":
            active = self.iface.activeLayer()
            return [lay for lay in result_layers() if active is not None and lay.id() == active.id()]
        return result_layers()

    def export_dialog(self, which: str) -> None:
        from ..core.errors import VirefsamError
        from .export import export_layers

        layers = self.layers_to_export(which)
        if not layers:
            self.iface.messageBar().pushMessage(
                TITLE, "There is no such result layer to export: run ViRefSAM first (or select a result layer).",
                Qgis.Warning, 5,
            )
            return
        start = settings.get("export_dir") or os.path.expanduser("~")
        path, _ = QFileDialog.getSaveFileName(
            self, "Export ViRefSAM results", start, "GeoPackage (*.gpkg);;ESRI Shapefile (*.shp)"
        )
        if not path:
            return
        if not os.path.splitext(path)[1]:
            path += ".gpkg"
        settings.set("export_dir", os.path.dirname(path))
        try:
            written = export_layers(layers, path, overwrite=True)  # the dialog asked before overwriting
        except VirefsamError as exc:
            self.iface.messageBar().pushMessage(TITLE, str(exc), Qgis.Critical, 0)
            return
        self.iface.messageBar().pushMessage(
            TITLE, f"Exported {len(layers)} layer(s) to {os.path.basename(path)}.", Qgis.Success, 5
        )
        return written

    # ========================================================================================== shutdown ======
    def shutdown(self) -> None:
        """Plugin unload: stop listening, cancel a run, take every tool and canvas item away."""
        self._preview_timer.stop()
        for signal, slot in (
            (self.project.layersAdded, self._layers_changed),
            (self.project.layersRemoved, self._layers_changed),
            (self.project.layerWillBeRemoved, self._layer_will_be_removed),
        ):
            try:
                signal.disconnect(slot)
            except (TypeError, RuntimeError):
                pass
        for task in (self.task, self.preview_task):
            if task is not None:
                task.on_finished = None  # the dock is going away: the task must not call back into it
                task.cancel()
        self.task = self.preview_task = None
        for tool in self.tools.values():
            if self.canvas.mapTool() is tool:
                self.canvas.unsetMapTool(tool)
            tool.remove_band()
        self.overlay.remove()


def _alive(layer) -> bool:
    try:
        layer.id()
        return True
    except RuntimeError:
        return False
