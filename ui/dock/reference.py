"""Dock section 1, class and reference: the class name, the reference raster, the marking tools (scribble,
background, polygon, selected features), the K references, and the live mask preview (quick, then densified by SAM
in a :class:`~ui.task.MaskPreviewTask`)."""

from __future__ import annotations

from typing import Optional

from qgis.core import (
    QgsApplication,
    QgsMapLayerProxyModel,
    QgsRasterLayer,
    QgsRectangle,
    QgsVectorLayer,
    QgsWkbTypes,
    QgsGeometry,
)
from qgis.gui import QgsCollapsibleGroupBox, QgsMapLayerComboBox
from qgis.PyQt.QtCore import Qt
from qgis.PyQt.QtWidgets import (
    QAction,
    QCheckBox,
    QFormLayout,
    QHBoxLayout,
    QLabel,
    QLineEdit,
    QListWidget,
    QPushButton,
    QSizePolicy,
    QToolButton,
    QWidget,
)

from .. import settings
from ..deps import describe_import_error, missing_dependencies
from ..map_tools import PolygonTool, ScribbleTool
from ..overlay import mask_geometry
from ..references import geometries_from_features, web_layer_reason
from ..task import MaskPreviewTask


class ReferenceSection:
    """The "1. Class and reference" box and everything the marks do. A mixin of :class:`~ui.dock.ViRefSamDock`: ``self`` is the dock."""

    # -- building ---------------------------------------------------------------------------------------------
    def _build_reference_box(self) -> QWidget:
        ref_box = QgsCollapsibleGroupBox("1. Class and reference")
        form = QFormLayout(ref_box)
        form.setRowWrapPolicy(QFormLayout.WrapLongRows)
        self.class_edit = QLineEdit()
        self.class_edit.setObjectName("class_name")
        self.class_edit.setPlaceholderText("e.g. building, tree, solar panel")
        form.addRow("Class name", self.class_edit)
        self._build_classes_row(form)  # several classes in one run (classes.py)
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
        self._build_corrections_row(form)  # "Not <class>" / "More like this" on result polygons (corrections.py)
        self.show_mask_check = QCheckBox("Show the reference mask")
        self.show_mask_check.setToolTip("Draw the dense mask the engine derives from the marks (yellow).")
        self.show_mask_check.setChecked(True)
        form.addRow("", self.show_mask_check)
        self.reference_status = QLabel()
        self.reference_status.setWordWrap(True)
        form.addRow("", self.reference_status)
        return ref_box

    def _connect_reference(self) -> None:
        self.reference_combo.layerChanged.connect(self._reference_layer_changed)
        self.add_selected_button.clicked.connect(self.add_selected_features)
        self.new_reference_button.clicked.connect(self.references.new_reference)
        self.remove_reference_button.clicked.connect(self.references.remove_current)
        self.undo_button.clicked.connect(self.references.undo)
        self.clear_button.clicked.connect(self.references.clear_current)
        self.reference_list.currentRowChanged.connect(self._reference_row_changed)
        self.show_mask_check.toggled.connect(self._schedule_preview)
        self.class_edit.editingFinished.connect(self.save_settings)

    def _load_reference_settings(self) -> None:
        self.class_edit.setText(settings.get("class_name"))

    def _save_reference_settings(self) -> None:
        settings.set("class_name", self.class_edit.text().strip())

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
        k = sum(len(r.marks) for r in self.references.negatives())
        self._set_reference_status(
            (f"{n} reference(s) ready" + (f", {k} negative example(s)." if k else "."))
            if n else "Mark one example of the class: scribble on it or draw its outline."
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
            from ...core.errors import VirefsamError

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
        from ...core.params import ModelParams

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
