"""The adapter choice in the dock: Shipped (ViRefSAM) / None (training-free) / File..., kept in QgsSettings, in
step with the mode; a missing or damaged file ends in one message-bar sentence; the result message says which
adapters file and mode a run used (real runs with the embedded SAM and the adapters in resources/adapters)."""

from pathlib import Path

import pytest

from core.params import DEFAULT_TUNE_STEPS

pytest.importorskip("qgis.gui")

from qgis.core import Qgis, QgsGeometry, QgsProject, QgsRasterLayer, QgsSettings, QgsVectorLayer  # noqa: E402
from qgis_iface import flush_deletes, set_up_run  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
TRAINED = ROOT / "resources" / "adapters" / "embedded_virefsam.pt"  # a real adapters file
TILE = "area2_OAM-1238452-1046530-21"


@pytest.fixture
def tile(qgis_project, shared_data):
    """One oam_buildings tile (256 px, EPSG:4326) in the project and its largest OSM building as the reference."""
    base = shared_data / "oam_buildings"
    layer = QgsRasterLayer(str(base / "images" / f"{TILE}.tif"), TILE)
    assert layer.isValid()
    qgis_project.addMapLayer(layer)
    labels = QgsVectorLayer(str(base / "labels_geojson" / f"{TILE}.geojson"), "labels", "ogr")
    polygon = max((f.geometry() for f in labels.getFeatures()), key=lambda g: g.area())
    return layer, QgsGeometry(polygon)


def prepare(dock, tile):
    layer, polygon = tile
    set_up_run(dock, layer, [polygon], [layer], mode=None)  # the mode follows the adapter choice


def choose(dock, value, path=None):
    dock.adapters_combo.setCurrentIndex(dock.adapters_combo.findData(value))
    if path is not None:
        dock.adapters_file_widget.setFilePath(str(path))


def messages(iface):
    return [(item.text(), item.level()) for item in iface.messageBar().items()]


# -- the control --------------------------------------------------------------------------------------------------
def test_adapters_control_choices_tooltip_and_mode_in_step(dock):
    from virefsam.core.pipeline import default_adapters

    combo = dock.adapters_combo
    assert [combo.itemText(i) for i in range(combo.count())] == [
        "Shipped (ViRefSAM)", "None (training-free)", "File…"]
    tip = combo.toolTip()
    for words in ("Shipped (ViRefSAM)", "resources/adapters", "None (training-free)", "File…", "python -m core train"):
        assert words in tip
    # the default: shipped adapters, mode ViRefSAM; the label says what that means today
    assert combo.currentData() == "shipped" and dock.mode_combo.currentData() == "virefsam"
    assert not dock.adapters_file_widget.isEnabled()
    shipped = default_adapters("embedded")
    if shipped is None:  # none shipped yet: "Shipped" runs training-free, and the dock says so
        assert "No adapters are shipped for the model 'embedded' yet" in dock.adapters_status.text()
        assert "training-free" in dock.adapters_status.text()
    else:
        assert shipped.name in dock.adapters_status.text()
    # None <-> mode Training-free, both ways; back to ViRefSAM restores the adapters chosen before
    choose(dock, "file", TRAINED)
    assert dock.adapters_file_widget.isEnabled() and dock.mode_combo.currentData() == "virefsam"
    assert dock.adapters_status.text() == f"ViRefSAM with {TRAINED.name}."
    dock.mode_combo.setCurrentIndex(dock.mode_combo.findData("training_free"))
    assert combo.currentData() == "none" and not dock.adapters_file_widget.isEnabled()
    dock.mode_combo.setCurrentIndex(dock.mode_combo.findData("virefsam"))
    assert combo.currentData() == "file" and dock.adapters_file_widget.filePath() == str(TRAINED)
    choose(dock, "none")
    assert dock.mode_combo.currentData() == "training_free"
    choose(dock, "shipped")
    assert dock.mode_combo.currentData() == "virefsam"
    # the model decides which file is "shipped"
    dock.model_combo.setCurrentIndex(dock.model_combo.findData("vit_b"))
    if default_adapters("vit_b") is None:
        assert "'vit_b'" in dock.adapters_status.text()


def test_precision_and_decoding_controls(dock):
    """Beside the device: the precision and decoding combos, their tooltips, and the decoding greyed out when the
    run uses adapters (it only matters for training-free runs, which "Shipped" is while none are shipped)."""
    from qgis.PyQt.QtWidgets import QComboBox, QSpinBox
    from virefsam.core.pipeline import default_adapters

    precision = dock.findChild(QComboBox, "precision")
    decoding = dock.findChild(QComboBox, "decoding")
    assert precision is dock.precision_combo and decoding is dock.decoding_combo
    assert [precision.itemData(i) for i in range(precision.count())] == ["fp32", "bf16", "fp16"]
    assert [decoding.itemText(i) for i in range(decoding.count())] == ["Local (fast)", "Exact (SAM on the whole tile)"]
    assert (precision.currentData(), decoding.currentData()) == ("fp32", "local")
    for words in ("fp32", "bf16", "AVX512-BF16", "fp16: CUDA GPUs only"):
        assert words in precision.toolTip()
    for words in ("training-free", "Local (fast)", "8x faster", "Exact", "whole tile"):
        assert words in decoding.toolTip()
    # the same form as the device
    form = dock.device_combo.parentWidget().layout()
    assert form.indexOf(precision) >= 0 and form.indexOf(decoding) >= 0
    assert decoding.isEnabled() == (default_adapters("embedded") is None)  # the default: Shipped
    choose(dock, "none")
    assert decoding.isEnabled()
    choose(dock, "file", TRAINED)
    assert not decoding.isEnabled()
    dock.mode_combo.setCurrentIndex(dock.mode_combo.findData("training_free"))
    assert decoding.isEnabled()
    dock.mode_combo.setCurrentIndex(dock.mode_combo.findData("virefsam"))
    assert not decoding.isEnabled() and precision.isEnabled()
    kshot = dock.findChild(QComboBox, "kshot")
    assert kshot is dock.kshot_combo and kshot.currentData() == "ensemble" and kshot.isEnabled()
    assert [kshot.itemData(i) for i in range(kshot.count())] == ["ensemble", "joint"]
    assert "averaged" in kshot.toolTip()
    tune = dock.findChild(QSpinBox, "tune_steps")
    assert tune is dock.tune_spin and tune.value() == DEFAULT_TUNE_STEPS and tune.isEnabled()
    assert "flips" in tune.toolTip()
    files = dock.findChild(QComboBox, "tune_files")
    assert files is dock.tune_files_combo and files.currentData() == "vcp_alone" and files.isEnabled()
    assert [files.itemData(i) for i in range(files.count())] == ["vcp_alone", "all", "auto"]
    choose(dock, "none")
    assert not kshot.isEnabled()  # training-free: nothing to ensemble
    assert not tune.isEnabled() and not files.isEnabled()  # nor to tune


def test_adapters_choice_is_kept_in_qgis_settings(dock, qgis_iface):
    from virefsam.ui import settings
    from virefsam.ui.dock import ViRefSamDock

    choose(dock, "file", TRAINED)
    s = QgsSettings()
    assert s.value("virefsam/adapters") == "file" and s.value("virefsam/adapters_file") == str(TRAINED)
    again = ViRefSamDock(qgis_iface)
    try:
        assert again.adapters_combo.currentData() == "file"
        assert again.adapters_file_widget.filePath() == str(TRAINED) and again.adapters_file_widget.isEnabled()
        assert again.mode_combo.currentData() == "virefsam"
    finally:
        again.shutdown()
        again.setParent(None)
        again.deleteLater()
        flush_deletes()
    # settings from before this control (mode training-free, no adapters key): the mode has the last word
    settings.reset()
    settings.set("mode", "training_free")
    old = ViRefSamDock(qgis_iface)
    try:
        assert old.mode_combo.currentData() == "training_free" and old.adapters_combo.currentData() == "none"
    finally:
        old.shutdown()
        old.setParent(None)
        old.deleteLater()
        flush_deletes()


def test_build_params_for_each_choice(dock, tile):
    prepare(dock, tile)
    p = dock.build_params()
    assert p.mode == "virefsam" and p.model.adapters == "auto"  # the shipped files, chosen by the reference
    choose(dock, "none")
    p = dock.build_params()
    assert p.mode == "training_free" and p.model.adapters is None
    choose(dock, "file", TRAINED)
    p = dock.build_params()
    assert p.mode == "virefsam" and p.model.adapters == str(TRAINED)


# -- refusals: one sentence in the message bar ---------------------------------------------------------------------
def test_missing_custom_file_is_one_message_before_any_task(dock, tile, qgis_iface, tmp_path):
    from virefsam.ui.adapters import NO_FILE_CHOSEN, missing_file_sentence

    prepare(dock, tile)
    gone = tmp_path / "gone" / "adapters.pt"
    choose(dock, "file", gone)
    assert dock.adapters_status.text() == "adapters.pt does not exist."
    assert dock.run() is None and not dock.is_running()
    assert messages(qgis_iface) == [(missing_file_sentence(str(gone)), Qgis.Warning)]
    assert "Traceback" not in messages(qgis_iface)[0][0]
    qgis_iface.messageBar().clearWidgets()
    choose(dock, "file", "")
    assert dock.run() is None
    assert messages(qgis_iface) == [(NO_FILE_CHOSEN, Qgis.Warning)]


def test_damaged_custom_file_is_one_message_from_the_engine(dock, tile, qgis_iface, qtbot, tmp_path):
    """A file that exists but holds no adapters (truncated): the real engine refuses it, the dock shows that one
    sentence (not "unexpected error") and adds no layer."""
    damaged = tmp_path / "half.pt"
    damaged.write_bytes(TRAINED.read_bytes()[:100_000])
    prepare(dock, tile)
    choose(dock, "file", damaged)
    n_layers = len(QgsProject.instance().mapLayers())
    task = dock.run()
    assert task is not None
    qtbot.waitUntil(lambda: not dock.is_running(), timeout=300000)
    ((text, level),) = messages(qgis_iface)
    assert level == Qgis.Critical and str(damaged) in text and "damaged" in text, text
    assert "unexpected" not in text and "Traceback" not in text
    assert len(QgsProject.instance().mapLayers()) == n_layers


# -- real runs: the message says which adapters and mode --------------------------------------------------------
def test_run_with_an_adapters_file_says_which_file_and_mode(dock, tile, qgis_iface, qtbot):
    prepare(dock, tile)
    choose(dock, "file", TRAINED)
    task = dock.run()
    assert task is not None, messages(qgis_iface)
    qtbot.waitUntil(lambda: not dock.is_running(), timeout=600000)
    assert task.error is None, task.error
    ((text, level),) = messages(qgis_iface)
    assert level == Qgis.Success and f"Mode: ViRefSAM, adapters {TRAINED}." in text
    assert f"adapters {TRAINED}" in dock.status_label.text()
    (layer,) = dock.last_layers
    assert {f["model"] for f in layer.getFeatures()} <= {"embedded+adapters"}


def test_run_with_the_shipped_choice_says_what_it_used(dock, tile, qgis_iface, qtbot):
    """"Shipped" with no adapters shipped for the model yet runs training-free and says so; once files are
    there, the check on the reference weighs them, and the message names what it used and says why."""
    from virefsam.core.engines import adapter_candidates
    from virefsam.core.params import ModelParams
    from virefsam.core.pipeline import default_adapters

    prepare(dock, tile)
    choose(dock, "shipped")
    task = dock.run()
    assert task is not None, messages(qgis_iface)
    qtbot.waitUntil(lambda: not dock.is_running(), timeout=600000)
    assert task.error is None, task.error
    ((text, level),) = messages(qgis_iface)
    assert level == Qgis.Success
    shipped = default_adapters("embedded")
    models = {f["model"] for layer in dock.last_layers for f in layer.getFeatures()}
    if shipped is None:
        assert "Mode: training-free (no adapters are shipped for the model 'embedded' yet)." in text
        assert models <= {"embedded (training_free)"}
    else:
        files = adapter_candidates(ModelParams(adapters="auto"))
        assert "Mode: ViRefSAM, adapters " in text and any(str(p) in text for p in files), text
        if len(files) > 1:
            assert "by the check on the reference" in text
        assert models <= {"embedded+adapters"}
