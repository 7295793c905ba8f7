"""Correcting a result in two clicks: select polygons of a result layer, then "Not <class>" (they become negative
examples on the raster they were found in) or "More like this" (one more shot of the class there).

Both are buttons of section 1 and entries of the result layers' context menu in the layer tree
(``iface.addCustomActionForLayerType`` / ``addCustomActionForLayer``, registered for every result layer). The
marks go into the dock's :class:`~ui.references.ReferenceSet` (undo works as for drawn marks); the next run
takes them (negative references: background marks only, see :mod:`core.reference`).
"""

from __future__ import annotations

import os
from typing import Optional

from qgis.core import QgsMapLayerType, QgsRasterLayer, QgsVectorLayer
from qgis.PyQt.QtWidgets import QAction, QHBoxLayout, QPushButton, QSizePolicy

from ..references import geometries_from_features, raster_path
from ..result_layers import RESULT_PROPERTY, SOURCE_PROPERTY, result_layers
from .common import TITLE


def _same_file(a: str, b: str) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return os.path.normcase(os.path.abspath(a)) == os.path.normcase(os.path.abspath(b))


class CorrectionsSection:
    """The "Correct a result" row and the result layers' context menu. A mixin of :class:`~ui.dock.ViRefSamDock`."""

    def _build_corrections_row(self, form) -> None:
        row = QHBoxLayout()
        self.not_class_button = QPushButton("Not the class")
        self.not_class_button.setObjectName("not_class")
        self.not_class_button.setToolTip(
            "The selected polygons of the active result layer are wrong: the next run uses them as negative "
            "examples (things that are not the class) on their raster.")
        self.more_like_button = QPushButton("More like this")
        self.more_like_button.setObjectName("more_like_this")
        self.more_like_button.setToolTip(
            "The selected polygons of the active result layer are right: the next run uses them as one more "
            "example of the class.")
        for b in (self.not_class_button, self.more_like_button):
            b.setSizePolicy(QSizePolicy.Ignored, QSizePolicy.Fixed)
            row.addWidget(b)
        form.addRow("Correct a result", row)
        # the same two commands in the layer tree's context menu of every result layer
        self.not_class_action = QAction("Not the class", self)
        self.more_like_action = QAction("More like this", self)
        for action in (self.not_class_action, self.more_like_action):
            self.iface.addCustomActionForLayerType(action, TITLE, QgsMapLayerType.VectorLayer, False)

    def _connect_corrections(self) -> None:
        self.not_class_button.clicked.connect(lambda: self.mark_selected_results(negative=True))
        self.more_like_button.clicked.connect(lambda: self.mark_selected_results(negative=False))
        self.not_class_action.triggered.connect(lambda: self.mark_selected_results(negative=True))
        self.more_like_action.triggered.connect(lambda: self.mark_selected_results(negative=False))
        self.class_edit.textChanged.connect(self._name_corrections)
        self._name_corrections()
        for layer in result_layers(self.project):
            self.offer_corrections(layer)

    def _name_corrections(self, *args) -> None:
        name = self.class_edit.text().strip()
        text = f"Not {name}" if name else "Not the class"
        self.not_class_button.setText(text)
        self.not_class_action.setText(text)

    def offer_corrections(self, layer: QgsVectorLayer) -> None:
        """Put "Not <class>" / "More like this" into ``layer``'s context menu (a result layer)."""
        for action in (self.not_class_action, self.more_like_action):
            self.iface.addCustomActionForLayer(action, layer)

    def _shutdown_corrections(self) -> None:
        for action in (self.not_class_action, self.more_like_action):
            try:
                self.iface.removeCustomActionForLayerType(action)
            except (AttributeError, RuntimeError):
                pass

    def _raster_of(self, layer: QgsVectorLayer) -> Optional[QgsRasterLayer]:
        source = layer.customProperty(SOURCE_PROPERTY) or ""
        for candidate in self.project.mapLayers().values():
            path = raster_path(candidate)
            if path and source and _same_file(path, source):
                return candidate
        return None

    def mark_selected_results(self, negative: bool, layer: Optional[QgsVectorLayer] = None) -> int:
        """The selected polygons of ``layer`` (default: the active layer, a result layer) as negative examples
        (``negative``) or as one more example of the class, on the raster they were found in. Returns how many
        polygons were marked; says why not in the reference status line otherwise."""
        layer = layer if layer is not None else self.iface.activeLayer()
        if not isinstance(layer, QgsVectorLayer) or not layer.customProperty(RESULT_PROPERTY):
            self._set_reference_status("Select polygons of a ViRefSAM result layer (make it the active layer) first.")
            return 0
        features = list(layer.getSelectedFeatures())
        if not features:
            self._set_reference_status(f"No polygon of '{layer.name()}' is selected: select the ones to correct.")
            return 0
        kinds = sorted({str(f["class_name"]) for f in features if f.fields().indexOf("class_name") >= 0} or
                       {str(layer.customProperty(RESULT_PROPERTY))})
        if len(kinds) > 1:
            self._set_reference_status(f"The selected polygons are of several classes ({', '.join(kinds)}): select "
                                       "polygons of one class.")
            return 0
        found_as = kinds[0]
        index = self.find_class(found_as)
        if index is not None:  # a class of the dock's list: show it
            self.show_class(index)
        name = self.class_edit.text().strip()
        if not name:
            self.class_edit.setText(found_as)
            name = found_as
        if name != found_as:
            self._set_reference_status(
                f"These polygons were found as '{found_as}', but the class in the dock is '{name}': type "
                f"'{found_as}' as the class name to correct them.")
            return 0
        raster = self._raster_of(layer)
        if raster is None:
            self._set_reference_status(
                f"The raster '{os.path.basename(str(layer.customProperty(SOURCE_PROPERTY)))}' of this result is not "
                "in the project any more: add it again to correct its polygons.")
            return 0
        geometries, _ = geometries_from_features(features, layer.crs(), raster)
        n = self.references.add_result_marks(raster, geometries, negative)
        what = f"not {name}: the next run uses them as negative examples" if negative else \
            f"more {name}: the next run uses them as one more example"
        self._set_reference_status(f"Marked {n} polygon(s) of '{layer.name()}' as {what} (Undo takes it back).")
        return n
