"""Reference tools on a real QgsMapCanvas showing a real raster: scribbles and polygons from mouse events,
CRS handling, undo / clear, K-shot, selected features, targets, settings."""

import pytest

pytest.importorskip("qgis.gui")

from qgis.core import (  # noqa: E402
    QgsCoordinateReferenceSystem,
    QgsCoordinateTransform,
    QgsFeature,
    QgsGeometry,
    QgsPointXY,
    QgsProject,
    QgsRasterLayer,
    QgsSettings,
    QgsVectorLayer,
    QgsWkbTypes,
)
from qgis.PyQt.QtCore import QCoreApplication, QEvent, QPoint, QPointF, Qt, QTimer  # noqa: E402
from qgis.PyQt.QtGui import QMouseEvent  # noqa: E402
from qgis_iface import flush_deletes  # noqa: E402


# -- helpers ------------------------------------------------------------------------------------------------------
def mouse(canvas, etype, pos, button=Qt.LeftButton, buttons=None, modifiers=Qt.NoModifier):
    """Deliver a real QMouseEvent to the canvas viewport (as a user's mouse does)."""
    if buttons is None:
        buttons = Qt.NoButton if etype == QEvent.MouseButtonRelease else button
    event = QMouseEvent(etype, QPointF(pos), button if etype != QEvent.MouseMove else Qt.NoButton, buttons, modifiers)
    QCoreApplication.sendEvent(canvas.viewport(), event)


def drag(canvas, points, modifiers=Qt.NoModifier):
    mouse(canvas, QEvent.MouseButtonPress, points[0], modifiers=modifiers)
    for p in points[1:]:
        mouse(canvas, QEvent.MouseMove, p, buttons=Qt.LeftButton, modifiers=modifiers)
    mouse(canvas, QEvent.MouseButtonRelease, points[-1], modifiers=modifiers)


def click(canvas, pos, button=Qt.LeftButton, modifiers=Qt.NoModifier):
    mouse(canvas, QEvent.MouseButtonPress, pos, button=button, modifiers=modifiers)
    mouse(canvas, QEvent.MouseButtonRelease, pos, button=button, modifiers=modifiers)


def to_map(canvas, pos):
    return canvas.getCoordinateTransform().toMapCoordinates(pos.x(), pos.y())


def zig_zag(canvas, n=12):
    c = canvas.viewport().rect().center()
    return [QPoint(c.x() - 60 + 10 * i, c.y() + (15 if i % 2 else -15)) for i in range(n)]


# -- fixtures -----------------------------------------------------------------------------------------------------
@pytest.fixture
def kampala(qgis_project, shared_data):
    layer = QgsRasterLayer(str(shared_data / "oam_mosaics" / "kampala.tif"), "kampala")
    assert layer.isValid()
    qgis_project.addMapLayer(layer)
    return layer


@pytest.fixture
def dock(qgis_app, qgis_iface, virefsam_pkg, kampala, qtbot):
    from virefsam.ui import settings
    from virefsam.ui.dock import ViRefSamDock

    settings.reset()
    canvas = qgis_iface.mapCanvas()
    canvas.setDestinationCrs(kampala.crs())
    d = ViRefSamDock(qgis_iface)
    qgis_iface.addDockWidget(Qt.RightDockWidgetArea, d)
    d.show()
    d.reference_combo.setLayer(kampala)
    canvas.setExtent(kampala.extent())
    canvas.refresh()
    qgis_app.processEvents()
    qtbot.waitUntil(lambda: canvas.mapSettings().outputSize().width() > 100)
    yield d
    d.shutdown()
    qgis_iface.removeDockWidget(d)
    d.setParent(None)
    d.deleteLater()
    flush_deletes()


# -- scribbles ----------------------------------------------------------------------------------------------------
def test_scribble_drag_becomes_a_line_in_the_raster_crs(dock, kampala, qgis_iface):
    canvas = qgis_iface.mapCanvas()
    dock.activate_tool("scribble")
    assert canvas.mapTool() is dock.scribble_tool and dock.scribble_action.isChecked()
    pts = zig_zag(canvas)
    drag(canvas, pts)

    ref = dock.references.current_reference
    assert len(ref.marks) == 1 and not ref.marks[0].background
    g = ref.marks[0].geometry
    assert g.type() == QgsWkbTypes.LineGeometry
    assert ref.crs.authid() == "EPSG:3857" and ref.layer_id == kampala.id()
    assert ref.raster.endswith("kampala.tif")
    line = g.asPolyline()
    assert len(line) == len(pts)
    assert kampala.extent().contains(g.boundingBox())
    first = to_map(canvas, pts[0])
    assert abs(line[0].x() - first.x()) < 1e-6 and abs(line[0].y() - first.y()) < 1e-6
    # the mark is on the canvas, and the reference is listed
    assert len(dock.overlay.mark_bands) == 1
    assert "1 foreground" in dock.reference_list.item(0).text()


def test_shift_scribble_and_background_tool_mark_background(dock, qgis_iface):
    canvas = qgis_iface.mapCanvas()
    dock.activate_tool("scribble")
    drag(canvas, zig_zag(canvas), modifiers=Qt.ShiftModifier)
    dock.activate_tool("background")
    assert canvas.mapTool() is dock.background_tool and not dock.scribble_action.isChecked()
    drag(canvas, zig_zag(canvas, 6))
    ref = dock.references.current_reference
    assert [m.background for m in ref.marks] == [True, True]
    assert len(ref.background) == 2 and ref.foreground == []
    # background alone is not a reference
    assert dock.references.non_empty() == []


def test_scribble_when_the_canvas_is_in_another_crs(dock, kampala, qgis_iface, qgis_app):
    """Marks are kept in the reference raster's CRS whatever the canvas shows."""
    canvas = qgis_iface.mapCanvas()
    wgs84 = QgsCoordinateReferenceSystem("EPSG:4326")
    canvas.setDestinationCrs(wgs84)
    ct = QgsCoordinateTransform(kampala.crs(), wgs84, QgsProject.instance())
    canvas.setExtent(ct.transformBoundingBox(kampala.extent()))
    canvas.refresh()
    qgis_app.processEvents()
    dock.activate_tool("scribble")
    pts = zig_zag(canvas)
    drag(canvas, pts)
    ref = dock.references.current_reference
    g = ref.marks[0].geometry
    assert ref.crs.authid() == "EPSG:3857"
    assert kampala.extent().contains(g.boundingBox())  # metres, not degrees
    expected = ct.transform(to_map(canvas, pts[0]), QgsCoordinateTransform.ReverseTransform)
    assert g.asPolyline()[0].distance(expected) < 0.01


def test_a_click_is_not_a_scribble_and_a_mark_outside_the_raster_is_refused(dock, kampala, qgis_iface):
    canvas = qgis_iface.mapCanvas()
    dock.activate_tool("scribble")
    c = canvas.viewport().rect().center()
    click(canvas, c)
    assert dock.references.total_marks() == 0
    assert "line" in dock.reference_status.text()
    # zoom far out so that part of the canvas lies outside the raster, and scribble there
    e = kampala.extent()
    canvas.setExtent(e.buffered(e.width() * 20))
    canvas.refresh()
    QCoreApplication.processEvents()
    drag(canvas, [QPoint(5, 5), QPoint(15, 8), QPoint(25, 5)])
    assert dock.references.total_marks() == 0
    assert "outside" in dock.reference_status.text()


# -- polygons -----------------------------------------------------------------------------------------------------
def test_polygon_tool_clicks_then_right_click(dock, kampala, qgis_iface):
    canvas = qgis_iface.mapCanvas()
    dock.activate_tool("polygon")
    c = canvas.viewport().rect().center()
    corners = [QPoint(c.x() - 40, c.y() - 30), QPoint(c.x() + 40, c.y() - 30), QPoint(c.x() + 40, c.y() + 30),
               QPoint(c.x() - 40, c.y() + 30)]
    for p in corners:
        click(canvas, p)
        mouse(canvas, QEvent.MouseMove, p + QPoint(3, 3), buttons=Qt.NoButton)
    assert len(dock.polygon_tool.points) == 4
    click(canvas, c, button=Qt.RightButton)
    ref = dock.references.current_reference
    assert len(ref.marks) == 1
    g = ref.marks[0].geometry
    assert g.type() == QgsWkbTypes.PolygonGeometry and g.isGeosValid()
    ring = g.asPolygon()[0]
    assert len(ring) == 5
    a, b = to_map(canvas, corners[0]), to_map(canvas, corners[2])
    assert abs(g.area() - abs(a.x() - b.x()) * abs(a.y() - b.y())) / g.area() < 1e-6
    assert kampala.extent().contains(g.boundingBox())


def test_polygon_backspace_escape_and_too_few_vertices(dock, qgis_iface, qtbot):
    canvas = qgis_iface.mapCanvas()
    dock.activate_tool("polygon")
    c = canvas.viewport().rect().center()
    for dx in (0, 50, 50):
        click(canvas, QPoint(c.x() + dx, c.y() + (30 if dx and len(dock.polygon_tool.points) == 2 else 0)))
    assert len(dock.polygon_tool.points) == 3
    qtbot.keyClick(canvas, Qt.Key_Backspace)
    assert len(dock.polygon_tool.points) == 2
    click(canvas, c, button=Qt.RightButton)  # 2 vertices: not a polygon
    assert dock.references.total_marks() == 0 and "3 vertices" in dock.reference_status.text()
    click(canvas, c)
    qtbot.keyClick(canvas, Qt.Key_Escape)
    assert dock.polygon_tool.points == []


# -- undo / clear / K-shot ----------------------------------------------------------------------------------------
def test_undo_clear_and_k_shot(dock, kampala, qgis_iface, shared_data):
    canvas = qgis_iface.mapCanvas()
    dock.activate_tool("scribble")
    drag(canvas, zig_zag(canvas))
    drag(canvas, zig_zag(canvas, 5))
    refs = dock.references
    assert refs.total_marks() == 2
    dock.undo_button.click()
    assert refs.total_marks() == 1
    dock.clear_button.click()
    assert refs.total_marks() == 0 and len(dock.overlay.mark_bands) == 0
    dock.undo_button.click()
    assert refs.total_marks() == 1 and len(dock.overlay.mark_bands) == 1

    # K-shot: a second reference on the same raster
    dock.new_reference_button.click()
    drag(canvas, zig_zag(canvas, 7))
    assert [len(r.marks) for r in refs.references] == [1, 1]
    assert [r.ref_id for r in refs.references] == ["ref1", "ref2"]
    assert dock.reference_list.count() == 2 and dock.reference_list.currentRow() == 1

    # a mark on another raster starts a further reference automatically
    other = QgsRasterLayer(str(shared_data / "oam_mosaics" / "zanzibar.tif"), "zanzibar")
    QgsProject.instance().addMapLayer(other)
    c = other.extent().center()
    refs.add_marks(other, [QgsGeometry.fromPolylineXY([c, QgsPointXY(c.x() + 3, c.y() + 2)])])
    assert [r.layer_name for r in refs.references] == ["kampala", "kampala", "zanzibar"]
    specs = [r.to_spec() for r in refs.non_empty()]
    assert [s.ref_id for s in specs] == ["ref1", "ref2", "ref3"]
    assert specs[2].raster.endswith("zanzibar.tif") and specs[2].foreground[0].startswith("LineString")
    # removing a raster from the project forgets its reference
    QgsProject.instance().removeMapLayer(other.id())
    assert [r.layer_name for r in refs.references] == ["kampala", "kampala"]
    dock.remove_reference_button.click()
    assert [r.ref_id for r in refs.references] == ["ref1"]


def test_selected_features_of_a_vector_layer_in_another_crs(dock, kampala, qgis_project):
    to_wgs84 = QgsCoordinateTransform(kampala.crs(), QgsCoordinateReferenceSystem("EPSG:4326"), qgis_project)
    e = kampala.extent()
    vector = QgsVectorLayer("Polygon?crs=EPSG:4326", "drawn", "memory")
    feats = []
    for k in range(3):
        x0 = e.xMinimum() + e.width() * (0.2 + 0.2 * k)
        y0 = e.yMinimum() + e.height() * 0.5
        ring = [QgsPointXY(x0, y0), QgsPointXY(x0 + 10, y0), QgsPointXY(x0 + 10, y0 + 10), QgsPointXY(x0, y0 + 10)]
        g = QgsGeometry.fromPolygonXY([ring])
        g.transform(to_wgs84)
        f = QgsFeature()
        f.setGeometry(g)
        feats.append(f)
    vector.dataProvider().addFeatures(feats)
    qgis_project.addMapLayer(vector)
    dock.vector_combo.setLayer(vector)
    assert dock.add_selected_features() == 0 and "selected" in dock.reference_status.text()
    vector.selectByIds([f.id() for f in vector.getFeatures()][:2])
    assert dock.add_selected_features() == 2
    ref = dock.references.current_reference
    assert len(ref.foreground) == 2
    for g in ref.foreground:
        assert kampala.extent().contains(g.boundingBox())
        assert abs(g.area() - 100.0) < 0.5  # back in EPSG:3857 metres
    dock.selected_background.setChecked(True)
    vector.selectByIds([f.id() for f in vector.getFeatures()][2:])
    assert dock.add_selected_features() == 1
    assert len(ref.background) == 1


# -- targets ------------------------------------------------------------------------------------------------------
def test_targets_all_rasters_by_default_web_layers_disabled(dock, kampala, qgis_project, shared_data):
    other = QgsRasterLayer(str(shared_data / "oam_mosaics" / "zanzibar.tif"), "zanzibar")
    xyz = QgsRasterLayer(
        "type=xyz&url=https://tile.openstreetmap.org/{z}/{x}/{y}.png&zmax=19&zmin=0", "OpenStreetMap", "wms"
    )
    qgis_project.addMapLayers([other, xyz])
    items = {dock.target_list.item(i).data(Qt.UserRole): dock.target_list.item(i)
             for i in range(dock.target_list.count())}
    assert set(items) == {kampala.id(), other.id(), xyz.id()}
    assert not items[xyz.id()].flags() & Qt.ItemIsEnabled
    assert "web" in items[xyz.id()].toolTip().lower() and "GeoTIFF" in items[xyz.id()].toolTip()
    assert {lay.id() for lay in dock.target_layers()} == {kampala.id(), other.id()}
    dock.include_reference_check.setChecked(False)
    assert {lay.id() for lay in dock.target_layers()} == {other.id()}
    dock.include_reference_check.setChecked(True)
    dock.set_targets([other])
    assert [lay.id() for lay in dock.target_layers()] == [other.id()]


def test_build_params_copies_plain_values(dock, kampala, qgis_iface, qgis_project, shared_data):
    from virefsam.core.errors import InputError

    canvas = qgis_iface.mapCanvas()
    with pytest.raises(InputError, match="reference"):
        dock.build_params()
    dock.activate_tool("scribble")
    drag(canvas, zig_zag(canvas))
    drag(canvas, zig_zag(canvas, 5), modifiers=Qt.ShiftModifier)
    other = QgsRasterLayer(str(shared_data / "oam_mosaics" / "zanzibar.tif"), "zanzibar")
    qgis_project.addMapLayer(other)
    dock.class_edit.setText("building")
    dock.mode_combo.setCurrentIndex(dock.mode_combo.findData("training_free"))
    dock.tile_spin.setValue(512)
    dock.overlap_spin.setValue(64)
    p = dock.build_params()
    assert p.class_name == "building" and p.mode == "training_free" and p.model.name == "embedded"
    assert p.model.adapters is None and p.tile_size == 512 and p.overlap == 64 and p.output is None
    assert len(p.references) == 1
    r = p.references[0]
    assert r.crs == "EPSG:3857" and len(r.foreground) == 1 and len(r.background) == 1
    assert all(isinstance(w, str) for w in r.foreground + r.background)
    assert {t.rsplit("/", 1)[-1] for t in p.targets} == {"kampala.tif", "zanzibar.tif"}
    assert p.decoding == "local" and p.model.precision == "fp32"  # the defaults
    dock.decoding_combo.setCurrentIndex(dock.decoding_combo.findData("exact"))
    dock.precision_combo.setCurrentIndex(dock.precision_combo.findData("bf16"))
    p = dock.build_params()
    assert p.decoding == "exact" and p.model.precision == "bf16"
    assert p.kshot == "ensemble"  # the default; in the Options box, for trained runs only
    assert not dock.kshot_combo.isEnabled()  # this run is training-free
    dock.kshot_combo.setCurrentIndex(dock.kshot_combo.findData("joint"))
    assert dock.build_params().kshot == "joint"
    from core.params import DEFAULT_TUNE_STEPS

    assert p.tune_steps == DEFAULT_TUNE_STEPS and dock.tune_spin.specialValueText() == "off"
    assert p.tune_files == "vcp_alone"  # run-time tuning: the objects file, when the check keeps it
    dock.tune_spin.setValue(7)
    dock.tune_files_combo.setCurrentIndex(dock.tune_files_combo.findData("all"))
    assert (dock.build_params().tune_steps, dock.build_params().tune_files) == (7, "all")
    assert p.zoom_views and not dock.zoom_views_check.isEnabled()  # on by default, trained runs only
    dock.zoom_views_check.setChecked(False)
    assert dock.build_params().zoom_views is False
    assert p.exclude_found and not dock.exclude_found_check.isEnabled()  # on by default, trained runs only
    dock.exclude_found_check.setChecked(False)
    assert dock.build_params().exclude_found is False
    assert p.min_object_share == 0.05  # specks under 5% of the smallest marked object go
    dock.min_share_spin.setValue(0.0)
    assert dock.build_params().min_object_share == 0.0
    assert p.self_support and not dock.self_support_check.isEnabled()  # on by default, trained runs only
    dock.self_support_check.setChecked(False)
    assert dock.build_params().self_support is False
    # a checkpoint model needs its file; a file output gets its format from the suffix
    dock.model_combo.setCurrentIndex(dock.model_combo.findData("vit_b"))
    with pytest.raises(InputError, match="checkpoint"):
        dock.build_params()
    dock.model_combo.setCurrentIndex(0)
    dock.file_radio.setChecked(True)
    dock.output_widget.setFilePath("/tmp/virefsam_out.shp")
    p = dock.build_params()
    assert p.output == "/tmp/virefsam_out.shp" and p.output_format == "shp" and p.overwrite is False


# -- settings -----------------------------------------------------------------------------------------------------
def test_settings_persist_between_docks(dock, qgis_iface, qgis_app):
    from virefsam.ui.dock import ViRefSamDock

    dock.class_edit.setText("solar panel")
    dock.class_edit.editingFinished.emit()
    dock.model_combo.setCurrentIndex(dock.model_combo.findData("vit_t"))
    dock.checkpoint_widget.setFilePath("/data/mobile_sam.pt")
    dock.mode_combo.setCurrentIndex(dock.mode_combo.findData("training_free"))
    dock.device_combo.setCurrentIndex(dock.device_combo.findData("cpu"))
    dock.precision_combo.setCurrentIndex(dock.precision_combo.findData("bf16"))
    dock.decoding_combo.setCurrentIndex(dock.decoding_combo.findData("exact"))
    dock.kshot_combo.setCurrentIndex(dock.kshot_combo.findData("joint"))
    dock.tune_spin.setValue(12)
    dock.tune_files_combo.setCurrentIndex(dock.tune_files_combo.findData("all"))
    dock.tile_spin.setValue(768)
    dock.overlap_spin.setValue(96)
    dock.threshold_spin.setValue(0.35)
    dock.min_area_spin.setValue(40.0)
    dock.simplify_spin.setValue(2.5)
    dock.file_radio.setChecked(True)
    dock.output_widget.setFilePath("/tmp/panels.gpkg")
    dock.include_reference_check.setChecked(False)

    s = QgsSettings()
    assert s.value("virefsam/class_name") == "solar panel"
    assert int(s.value("virefsam/tile_size")) == 768
    assert s.value("virefsam/precision") == "bf16" and s.value("virefsam/decoding") == "exact"

    again = ViRefSamDock(qgis_iface)
    try:
        assert again.class_edit.text() == "solar panel"
        assert again.model_combo.currentData() == "vit_t"
        assert again.checkpoint_widget.filePath() == "/data/mobile_sam.pt" and again.checkpoint_widget.isEnabled()
        assert again.mode_combo.currentData() == "training_free"
        assert again.device_combo.currentData() == "cpu"
        assert again.precision_combo.currentData() == "bf16" and again.decoding_combo.currentData() == "exact"
        assert again.kshot_combo.currentData() == "joint"
        assert again.tune_spin.value() == 12 and again.tune_files_combo.currentData() == "all"
        assert (again.tile_spin.value(), again.overlap_spin.value()) == (768, 96)
        assert abs(again.threshold_spin.value() - 0.35) < 1e-9
        assert again.min_area_spin.value() == 40.0 and again.simplify_spin.value() == 2.5
        assert again.file_radio.isChecked() and again.output_widget.filePath() == "/tmp/panels.gpkg"
        assert not again.include_reference_check.isChecked()
    finally:
        again.shutdown()
        again.setParent(None)
        again.deleteLater()
        flush_deletes()


def test_reference_mask_preview(dock, kampala, qgis_iface, qtbot):
    """The dense mask the engine derives from the marks is drawn on the canvas before anything runs."""
    pytest.importorskip("virefsam.core.reference")
    canvas = qgis_iface.mapCanvas()
    dock.activate_tool("polygon")
    c = canvas.viewport().rect().center()
    for p in (QPoint(c.x() - 30, c.y() - 20), QPoint(c.x() + 30, c.y() - 20), QPoint(c.x() + 30, c.y() + 20)):
        click(canvas, p)
    click(canvas, c, button=Qt.RightButton)
    dock.update_mask_preview()
    assert dock.mask_error == ""
    assert dock.mask_pixels > 0
    band = dock.overlay.mask_band
    assert band is not None and band.numberOfVertices() > 0
    g = band.asGeometry()
    assert g.area() > 0
    dock.undo_button.click()
    dock.update_mask_preview()
    assert dock.mask_pixels == 0


def _house_scribble(shared_data):
    """A short line inside a house-sized building footprint of kampala (EPSG:3857)."""
    import rasterio
    from rasterio import features
    from shapely.geometry import LineString, shape

    with rasterio.open(shared_data / "oam_mosaics" / "kampala_buildings.tif") as src:
        mask = src.read(1) > 0
        polys = [shape(g) for g, v in features.shapes(mask.astype("uint8"), mask=mask, transform=src.transform) if v]
    building = max((p for p in polys if p.area < 400), key=lambda p: p.area)  # a house-sized footprint
    c = building.representative_point()
    w = (building.bounds[2] - building.bounds[0]) / 4
    line = LineString([(c.x - w, c.y), (c.x + w, c.y)]).intersection(building.buffer(-0.5))
    assert line.length > 1
    return line


def test_scribble_mask_preview_is_densified_by_sam_in_the_background(dock, kampala, qgis_iface, qtbot, shared_data):
    """A scribble inside one building: at once a buffered line, then SAM's dense mask (a QgsTask), as a run will."""
    pytest.importorskip("virefsam.core.pipeline")
    dock.references.add_marks(kampala, [QgsGeometry.fromWkt(_house_scribble(shared_data).wkt)])
    qtbot.waitUntil(lambda: dock.preview_task is not None, timeout=5000)  # the quick preview is shown first
    quick = dock.mask_pixels
    assert quick > 0 and not dock.mask_densified
    ticks = []
    timer = QTimer()
    timer.timeout.connect(lambda: ticks.append(1))
    timer.start(50)
    qtbot.waitUntil(lambda: dock.preview_task is None and dock.mask_densified, timeout=300000)
    timer.stop()
    assert ticks, "the GUI thread was blocked while SAM densified the scribble"
    assert dock.mask_densified, dock.reference_status.text()
    assert dock.mask_pixels > 2 * quick
    g = dock.overlay.mask_band.asGeometry()
    assert g.area() > 0 and kampala.extent().contains(g.boundingBox())
    assert "SAM" in dock.reference_status.text()


def test_gpu_out_of_memory_in_the_mask_preview(dock, kampala, qgis_iface, qtbot, shared_data, monkeypatch):
    """INJECTED (no GPU here): torch.cuda.OutOfMemoryError from SAM while the preview densifies a scribble.
    Once: the preview is densified on the CPU and says so. Every time (the CPU copy too, as when loading the
    model fails): the reference status shows the one out-of-memory sentence, not "No SAM preview: <error>"."""
    pytest.importorskip("virefsam.core.pipeline")
    import torch
    from virefsam.core.modeling.engine import SamEngine
    from virefsam.core.pipeline import DENSIFY_CPU_NOTE
    from virefsam.ui.task import GPU_OUT_OF_MEMORY

    real_predict = SamEngine.predict
    calls = []

    def predict_oom(self, image, *args, **kwargs):
        calls.append(self)
        if always or len(calls) == 1:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (injected by the test)")
        return real_predict(self, image, *args, **kwargs)

    monkeypatch.setattr(SamEngine, "predict", predict_oom)
    always = True
    dock.device_combo.setCurrentIndex(dock.device_combo.findData("cpu"))
    dock.references.add_marks(kampala, [QgsGeometry.fromWkt(_house_scribble(shared_data).wkt)])
    qtbot.waitUntil(lambda: dock.preview_task is not None, timeout=5000)
    qtbot.waitUntil(lambda: dock.preview_task is None, timeout=300000)
    assert dock.reference_status.text() == GPU_OUT_OF_MEMORY
    assert len(calls) == 2 and calls[1] is not calls[0]  # the CPU copy was tried too
    assert not dock.mask_densified

    always = False
    calls.clear()
    dock.update_mask_preview()
    qtbot.waitUntil(lambda: dock.preview_task is None and dock.mask_densified, timeout=300000)
    assert dock.reference_status.text().endswith(DENSIFY_CPU_NOTE)
    assert len(calls) == 2 and calls[1].device.type == "cpu" and calls[1] is not calls[0]
