"""Dock section 2, targets: one checkable item per raster layer of the project (web layers disabled), the
reference raster included or not."""

from __future__ import annotations

from typing import List

from qgis.core import QgsRasterLayer
from qgis.gui import QgsCollapsibleGroupBox
from qgis.PyQt.QtCore import Qt
from qgis.PyQt.QtWidgets import (
    QCheckBox,
    QHBoxLayout,
    QListWidget,
    QListWidgetItem,
    QPushButton,
    QSizePolicy,
    QVBoxLayout,
    QWidget,
)

from .. import settings
from ..references import raster_path, web_layer_reason


class TargetsSection:
    """The "2. Target rasters" box. A mixin of :class:`~ui.dock.ViRefSamDock`: ``self`` is the dock."""

    def _build_targets_box(self) -> QWidget:
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
        return target_box

    def _connect_targets(self) -> None:
        self.include_reference_check.toggled.connect(self._include_reference_toggled)
        self.all_targets_button.clicked.connect(lambda: self._check_all_targets(True))
        self.no_targets_button.clicked.connect(lambda: self._check_all_targets(False))
        self.include_reference_check.toggled.connect(self.save_settings)

    def _load_targets_settings(self) -> None:
        self.include_reference_check.setChecked(settings.get("include_reference"))

    def _save_targets_settings(self) -> None:
        settings.set("include_reference", self.include_reference_check.isChecked())

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
        # marks made from result polygons ("Not <class>", "More like this") leave their raster a target
        ids = {r.layer_id for r in self.references.references if r.layer_id and not r.on_target}
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
