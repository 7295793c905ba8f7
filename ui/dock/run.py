"""Dock section 4, output and run: temporary layers or a file, the progress bar, Run / Cancel / Export, the
:class:`~core.params.RunParams` of the dock's state (:meth:`RunSection.build_params`), the
:class:`~ui.task.SegmentTask` and its end, and the export of result layers.

Where a run goes (e.g. a "Run on: this computer / Dask cluster" control) belongs here: its widget in
:meth:`RunSection._build_output_box` or :meth:`RunSection._build_run_row`, its value into ``build_params``, the
start of the run in :meth:`RunSection.run`."""

from __future__ import annotations

import os
from typing import List, Optional

from qgis.core import Qgis, QgsApplication, QgsVectorLayer
from qgis.gui import QgsCollapsibleGroupBox, QgsFileWidget
from qgis.PyQt.QtGui import QIcon
from qgis.PyQt.QtWidgets import (
    QButtonGroup,
    QFileDialog,
    QFormLayout,
    QHBoxLayout,
    QLabel,
    QMenu,
    QProgressBar,
    QPushButton,
    QRadioButton,
    QVBoxLayout,
    QWidget,
)

from .. import adapters as adapter_choice
from .. import settings
from ..deps import install_message, missing_dependencies
from ..references import raster_path, web_layer_reason
from ..result_layers import add_result_layers, result_layers
from ..task import SegmentTask
from .common import _alive, ICON, TITLE


class RunSection:
    """The "4. Output" box, the run row and export. A mixin of :class:`~ui.dock.ViRefSamDock`: ``self`` is the dock."""

    def _build_output_box(self) -> QWidget:
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
        return out_box

    def _build_run_row(self, ov: QVBoxLayout) -> None:
        """Progress bar, status line and the Run / Cancel / Export row, below the scrolled sections."""
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

    def _connect_run(self) -> None:
        self.file_radio.toggled.connect(self._output_mode_changed)
        self.output_widget.fileChanged.connect(self._output_changed)
        self.run_button.clicked.connect(self.run)
        self.cancel_button.clicked.connect(self.cancel)
        self.export_last_action.triggered.connect(lambda: self.export_dialog("last"))
        self.export_selected_action.triggered.connect(lambda: self.export_dialog("selected"))
        self.export_all_action.triggered.connect(lambda: self.export_dialog("all"))
        self.file_radio.toggled.connect(self.save_settings)

    def _load_run_settings(self) -> None:
        self.file_radio.setChecked(settings.get("output_to_file"))
        self.memory_radio.setChecked(not settings.get("output_to_file"))
        self.output_widget.setFilePath(settings.get("output_path"))
        self._output_mode_changed()

    def _save_run_settings(self) -> None:
        settings.set("output_to_file", self.file_radio.isChecked())
        settings.set("output_path", self.output_widget.filePath())

    def _output_mode_changed(self, *args) -> None:
        self.output_widget.setEnabled(self.file_radio.isChecked())

    def _output_changed(self, path: str) -> None:
        # a path picked in the file dialog was confirmed there (setConfirmOverwrite)
        self._confirmed_output = path if path and os.path.exists(path) else ""
        self.save_settings()

    def build_params(self):
        """The frozen RunParams of the dock's current state (main thread; plain strings and numbers only)."""
        from ...core.errors import InputError
        from ...core.params import ModelParams, RunParams

        from ...core.params import ClassSpec

        listed = [(n, r) for n, r in self.class_references() if n or r]  # an added class left empty: ignored
        classes = ()
        if len(listed) > 1:  # several classes in one run (classes.py)
            for name, refs in listed:
                if not name:
                    raise InputError("A class has no name: type the name of every class (e.g. building, tree).")
                if not any(r.foreground for r in refs):
                    raise InputError(f"Class '{name}' has no example yet: mark one, or remove the class.")
            classes = tuple(ClassSpec(n, tuple(r.to_spec() for r in refs)) for n, refs in listed)
            class_name, refs = "+".join(n for n, _ in listed), []
            for _, r in listed:
                refs.extend(r)
        else:
            class_name = self.class_edit.text().strip()
            if not class_name:
                raise InputError("Type the name of the class first (e.g. building).")
            refs = self.references.usable()  # examples of the class and negative examples ("Not <class>")
            if not any(r.foreground for r in refs):
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
            references=() if classes else tuple(r.to_spec() for r in refs),
            classes=classes,
            allow_overlap=self.allow_overlap_check.isChecked(),
            layer_per_class=self.layer_per_class_check.isChecked(),
            targets=tuple(dict.fromkeys(targets)),
            output=output,
            output_format=fmt,
            overwrite=overwrite,
            model=model,
            mode=mode,
            decoding=self.decoding_combo.currentData(),
            kshot=self.kshot_combo.currentData(),
            tune_steps=self.tune_spin.value(),
            tune_files=self.tune_files_combo.currentData(),
            zoom_views=self.zoom_views_check.isChecked(),
            exclude_found=self.exclude_found_check.isChecked(),
            self_support=self.self_support_check.isChecked(),
            tile_size=self.tile_spin.value(),
            overlap=self.overlap_spin.value(),
            threshold=self.threshold_spin.value(),
            min_area=self.min_area_spin.value(),
            min_object_share=self.min_share_spin.value(),
            simplify=self.simplify_spin.value(),
            scale=self.scale_text(),
            cluster=self.run_on.cluster(),  # "" = this computer (ui/run_on.py)
        )

    def is_running(self) -> bool:
        return self.task is not None

    def run(self, runner=None) -> Optional[SegmentTask]:
        """Start a run in a QgsTask (``runner`` replaces core.pipeline.run in tests). Returns the task."""
        from ...core.errors import VirefsamError

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
        self.scale_status.setText(result.scale)
        self.last_layers = add_result_layers(result)
        for layer in self.last_layers:
            self.offer_corrections(layer)  # "Not <class>" / "More like this" in its context menu
        text = f"{result.summary()} {adapter_choice.describe_run(result.params)}"
        if result.output:
            text += f" Written to {result.output}."
        skipped = [t for t in result.targets if t.skipped]
        if skipped:
            text += " Skipped: " + "; ".join(f"{os.path.basename(t.raster)} ({t.skipped})" for t in skipped) + "."
        self.status_label.setText(text)
        bar.pushMessage(TITLE, text, Qgis.Success, 10)

    def layers_to_export(self, which: str) -> List[QgsVectorLayer]:
        if which == "last":
            return [lay for lay in self.last_layers if _alive(lay)]
        if which == "selected":
            active = self.iface.activeLayer()
            return [lay for lay in result_layers() if active is not None and lay.id() == active.id()]
        return result_layers()

    def export_dialog(self, which: str) -> None:
        from ...core.errors import VirefsamError
        from ..export import export_layers

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
