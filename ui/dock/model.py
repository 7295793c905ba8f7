"""Dock section 3, model: which SAM (and its checkpoint), the mode and the adapters (two views of one choice),
device, precision, decoding, and the Options box (tile size, overlap, threshold, minimum area, simplification,
working scale, how several references combine).

A new model-side control (e.g. an "Install dependencies" panel) goes here: build it in
:meth:`ModelSection._build_model_boxes`, connect it in :meth:`ModelSection._connect_model`, keep it in the
settings through :meth:`ModelSection._load_model_settings` / :meth:`ModelSection._save_model_settings`."""

from __future__ import annotations

from typing import List

from qgis.gui import QgsCollapsibleGroupBox, QgsFileWidget
from qgis.PyQt.QtWidgets import QCheckBox, QComboBox, QDoubleSpinBox, QFormLayout, QLabel, QLineEdit, QSpinBox, QWidget

from .. import adapters as adapter_choice
from .. import run_options, settings
from .common import _choice_combo, _set_combo_data, DEVICES, MODELS, MODES

SCALE_TOOLTIP = (
    "The resolution the model works at, as a zoom of the reference raster's own resolution:\n"
    "• auto (empty): chosen from the size of the objects you marked, so that they look to the model as large as "
    "it works best with; marks far apart are then cut as several reference crops at that scale.\n"
    "• a number: 1 = the raster's resolution, 0.5 = half (larger objects), 2 = twice (small objects).\n"
    "Targets are resampled to the same ground resolution. The last run's scale is shown below."
)


class ModelSection:
    """The "3. Model" and "Options" boxes. A mixin of :class:`~ui.dock.ViRefSamDock`: ``self`` is the dock."""

    def _build_model_boxes(self) -> List[QWidget]:
        """The model box (model, checkpoint, mode, adapters, device, precision, decoding) and the options box."""
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
        self.min_share_spin = QDoubleSpinBox()
        self.min_share_spin.setRange(0, 0.99)
        self.min_share_spin.setDecimals(2)
        self.min_share_spin.setSingleStep(0.05)
        self.min_share_spin.setSuffix(" × smallest mark")
        self.min_share_spin.setToolTip(
            "Polygons smaller than this share of the smallest marked object's area are dropped (specks of a few "
            "pixels). 0 keeps every polygon above the minimum area.")
        of.addRow("Smallest object", self.min_share_spin)
        self.simplify_spin = QDoubleSpinBox()
        self.simplify_spin.setRange(0, 100)
        self.simplify_spin.setDecimals(2)
        self.simplify_spin.setSuffix(" px")
        of.addRow("Simplification", self.simplify_spin)
        self.scale_edit = QLineEdit()
        self.scale_edit.setObjectName("scale")
        self.scale_edit.setPlaceholderText("auto")
        self.scale_edit.setToolTip(SCALE_TOOLTIP)
        of.addRow("Working scale", self.scale_edit)
        self.kshot_combo = _choice_combo("kshot", run_options.KSHOTS, run_options.KSHOT_TOOLTIP)
        of.addRow("Several references", self.kshot_combo)
        self.zoom_views_check = QCheckBox("Also match the references zoomed out and in")
        self.zoom_views_check.setObjectName("zoom_views")
        self.zoom_views_check.setToolTip(run_options.ZOOM_VIEWS_TOOLTIP)
        of.addRow("Zoomed views", self.zoom_views_check)
        self.exclude_found_check = QCheckBox("Unmarked objects found in the references are not background")
        self.exclude_found_check.setObjectName("exclude_found")
        self.exclude_found_check.setToolTip(run_options.EXCLUDE_FOUND_TOOLTIP)
        of.addRow("Partial marks", self.exclude_found_check)
        self.self_support_check = QCheckBox("Decode each target again with its own confident objects")
        self.self_support_check.setObjectName("self_support")
        self.self_support_check.setToolTip(run_options.SELF_SUPPORT_TOOLTIP)
        of.addRow("Self-support", self.self_support_check)
        self.tune_spin = QSpinBox()
        self.tune_spin.setObjectName("tune_steps")
        self.tune_spin.setRange(0, 500)
        self.tune_spin.setSpecialValueText("off")
        self.tune_spin.setSuffix(" steps")
        self.tune_spin.setToolTip(run_options.TUNE_TOOLTIP)
        of.addRow("Tune on the references", self.tune_spin)
        self.tune_files_combo = _choice_combo("tune_files", run_options.TUNE_FILES, run_options.TUNE_FILES_TOOLTIP)
        of.addRow("Files to tune", self.tune_files_combo)
        self.scale_status = QLabel()  # the scale the last run worked at (RunResult.scale)
        self.scale_status.setObjectName("scale_status")
        self.scale_status.setWordWrap(True)
        of.addRow("", self.scale_status)
        from .. import run_on  # "Run on: this computer / Dask cluster at" (ui/run_on.py)

        self.run_on = run_on.add_to_form(of)
        for combo in (self.model_combo, self.mode_combo, self.adapters_combo, self.device_combo,
                      self.precision_combo, self.decoding_combo, self.kshot_combo, self.tune_files_combo):
            combo.setSizeAdjustPolicy(QComboBox.AdjustToMinimumContentsLengthWithIcon)
            combo.setMinimumContentsLength(12)
        return [model_box, opt_box]

    def _connect_model(self) -> None:
        self.model_combo.currentIndexChanged.connect(self._model_changed)
        self.mode_combo.currentIndexChanged.connect(self._mode_changed)
        self.adapters_combo.currentIndexChanged.connect(self._adapters_changed)
        self.adapters_file_widget.fileChanged.connect(self._update_adapters_widgets)
        for w in (self.model_combo, self.mode_combo, self.adapters_combo, self.device_combo, self.precision_combo,
                  self.decoding_combo, self.kshot_combo, self.tune_files_combo):
            w.currentIndexChanged.connect(self.save_settings)
        for w in (self.tile_spin, self.overlap_spin, self.threshold_spin, self.min_area_spin, self.min_share_spin,
                  self.simplify_spin, self.tune_spin):
            w.valueChanged.connect(self.save_settings)
        self.zoom_views_check.toggled.connect(self.save_settings)
        self.exclude_found_check.toggled.connect(self.save_settings)
        self.self_support_check.toggled.connect(self.save_settings)
        self.scale_edit.editingFinished.connect(self.save_settings)
        self.checkpoint_widget.fileChanged.connect(self.save_settings)
        self.adapters_file_widget.fileChanged.connect(self.save_settings)

    def _load_model_settings(self) -> None:
        _set_combo_data(self.model_combo, settings.get("model"))
        self.checkpoint_widget.setFilePath(settings.get("checkpoint"))
        self.adapters_file_widget.setFilePath(settings.get("adapters_file"))
        _set_combo_data(self.adapters_combo, settings.get("adapters"))  # before the mode: the mode has the last word
        _set_combo_data(self.mode_combo, settings.get("mode"))
        _set_combo_data(self.device_combo, settings.get("device"))
        _set_combo_data(self.precision_combo, settings.get("precision"))
        _set_combo_data(self.decoding_combo, settings.get("decoding"))
        _set_combo_data(self.kshot_combo, settings.get("kshot"))
        self.tune_spin.setValue(settings.get("tune_steps"))
        _set_combo_data(self.tune_files_combo, settings.get("tune_files"))
        self.zoom_views_check.setChecked(settings.get("zoom_views"))
        self.exclude_found_check.setChecked(settings.get("exclude_found"))
        self.self_support_check.setChecked(settings.get("self_support"))
        self.tile_spin.setValue(settings.get("tile_size"))
        self.overlap_spin.setValue(settings.get("overlap"))
        self.threshold_spin.setValue(settings.get("threshold"))
        self.min_area_spin.setValue(settings.get("min_area"))
        self.min_share_spin.setValue(settings.get("min_object_share"))
        self.simplify_spin.setValue(settings.get("simplify"))
        self.scale_edit.setText(settings.get("scale"))
        self._model_changed()

    def _save_model_settings(self) -> None:
        settings.set("model", self.model_combo.currentData())
        settings.set("checkpoint", self.checkpoint_widget.filePath())
        settings.set("mode", self.mode_combo.currentData())
        settings.set("adapters", self.adapters_combo.currentData())
        settings.set("adapters_file", self.adapters_file_widget.filePath())
        settings.set("device", self.device_combo.currentData())
        settings.set("precision", self.precision_combo.currentData())
        settings.set("decoding", self.decoding_combo.currentData())
        settings.set("kshot", self.kshot_combo.currentData())
        settings.set("tune_steps", self.tune_spin.value())
        settings.set("tune_files", self.tune_files_combo.currentData())
        settings.set("zoom_views", self.zoom_views_check.isChecked())
        settings.set("exclude_found", self.exclude_found_check.isChecked())
        settings.set("self_support", self.self_support_check.isChecked())
        settings.set("tile_size", self.tile_spin.value())
        settings.set("overlap", self.overlap_spin.value())
        settings.set("threshold", self.threshold_spin.value())
        settings.set("min_area", self.min_area_spin.value())
        settings.set("min_object_share", self.min_share_spin.value())
        settings.set("simplify", self.simplify_spin.value())
        settings.set("scale", self.scale_text())

    def scale_text(self) -> str:
        """``RunParams.scale``: what the field says, ``auto`` when empty."""
        return self.scale_edit.text().strip() or "auto"

    def _model_changed(self, *args) -> None:
        self.checkpoint_widget.setEnabled(self.model_combo.currentData() != "embedded")
        self._update_adapters_widgets()

    # The mode and the adapters are two views of one choice: "None (training-free)" <-> mode Training-free;
    # Shipped or File <-> mode ViRefSAM. Changing one sets the other; going back to ViRefSAM restores the adapters
    # chosen before.

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
        training_free = adapter_choice.runs_training_free(choice, self.model_combo.currentData())
        self.decoding_combo.setEnabled(training_free)
        self.kshot_combo.setEnabled(not training_free)  # how several references combine: the trained mode only
        self.zoom_views_check.setEnabled(not training_free)
        self.exclude_found_check.setEnabled(not training_free)
        self.self_support_check.setEnabled(not training_free)
        self.tune_spin.setEnabled(not training_free)  # run-time tuning of VCP: the trained mode only
        self.tune_files_combo.setEnabled(not training_free)
        self.adapters_status.setText(adapter_choice.describe_choice(
            choice, self.model_combo.currentData(), self.adapters_file_widget.filePath()))
