"""Runs from the dock: QgsTask in QGIS's task manager, progress, cancel, errors, result layers, export.

Two kinds of tests:
* with the real engine (``core.pipeline.run``, embedded SAM, real oam_buildings tiles): end to end;
* with ``runner=`` standing in for the engine where a test needs a controlled duration or failure (cancel
  timing, an engine bug): everything else (QgsTask, task manager, threads, layers, message bar) is real.
"""

import os
import threading
import time
from pathlib import Path

import pytest

pytest.importorskip("qgis.gui")

from qgis.core import (  # noqa: E402
    Qgis,
    QgsApplication,
    QgsGeometry,
    QgsProject,
    QgsRasterLayer,
    QgsVectorLayer,
)
from qgis.PyQt.QtCore import QTimer  # noqa: E402
from qgis_iface import set_up_run  # noqa: E402

REF_TILE = "area2_OAM-1238452-1046530-21"
TARGET_TILES = ("area2_OAM-1238449-1046529-21", "area2_OAM-1238454-1046535-21")


# -- fixtures -----------------------------------------------------------------------------------------------------
@pytest.fixture
def tiles(qgis_project, shared_data):
    """Reference tile + 2 target tiles of oam_buildings (EPSG:4326) in the project, and the reference polygon."""
    base = shared_data / "oam_buildings"
    ref = QgsRasterLayer(str(base / "images" / f"{REF_TILE}.tif"), REF_TILE)
    targets = [QgsRasterLayer(str(base / "images" / f"{t}.tif"), t) for t in TARGET_TILES]
    assert ref.isValid() and all(t.isValid() for t in targets)
    qgis_project.addMapLayers([ref] + targets)
    labels = QgsVectorLayer(str(base / "labels_geojson" / f"{REF_TILE}.geojson"), "labels", "ogr")
    assert labels.isValid() and labels.featureCount() > 0
    polygon = max((f.geometry() for f in labels.getFeatures()), key=lambda g: g.area())
    return ref, targets, QgsGeometry(polygon)


def prepare(dock, tiles, class_name="building"):
    ref, targets, polygon = tiles
    set_up_run(dock, ref, [polygon], targets, include_reference=False, class_name=class_name)
    return ref, targets


def messages(iface):
    return [(item.text(), item.level()) for item in iface.messageBar().items()]


def fake_result(params, polygons_per_target=2):
    """A RunResult as the engine makes it: shapely polygons in each raster's CRS (EPSG:4326 here)."""
    import rasterio
    from shapely.geometry import box
    from virefsam.core.results import Feature, RunResult, TargetResult

    out = RunResult(params=params, seconds=1.5)
    for path in params.targets:
        with rasterio.open(path) as src:
            b, crs_wkt = src.bounds, src.crs.to_wkt()
        w, h = b.right - b.left, b.top - b.bottom
        feats = [
            Feature(
                box(b.left + w * (0.1 + 0.4 * k), b.bottom + h * 0.3, b.left + w * (0.3 + 0.4 * k), b.bottom + h * 0.6),
                {"class_name": params.class_name, "score": 0.8, "area": 12.5, "area_unit": "m2", "source": path,
                 "ref_id": "ref1", "model": "embedded"},
            )
            for k in range(polygons_per_target)
        ]
        out.targets.append(TargetResult(raster=path, crs_wkt=crs_wkt, features=feats, seconds=0.7))
    return out


def slow_runner(seconds=1.5, result=True):
    """Stands in for core.pipeline.run: reports progress and honours is_cancelled like the engine."""

    def run(params, progress=None, is_cancelled=None):
        from virefsam.core.errors import CancelledError

        run.thread = threading.get_ident()
        steps = 30
        for i in range(steps):
            if is_cancelled and is_cancelled():
                raise CancelledError()
            time.sleep(seconds / steps)
            if progress:
                progress((i + 1) / steps, f"tile {i + 1}/{steps}")
        return fake_result(params) if result else None

    return run


# -- task mechanics -----------------------------------------------------------------------------------------------
def test_run_in_a_task_keeps_the_event_loop_running_and_adds_grouped_layers(dock, tiles, qgis_iface, qtbot):
    from virefsam.core.results import FIELDS
    from virefsam.ui.result_layers import RESULT_PROPERTY

    ref, targets = prepare(dock, tiles)
    ticks = []
    timer = QTimer()
    timer.timeout.connect(lambda: ticks.append(time.time()))
    timer.start(20)
    runner = slow_runner(1.5)
    progress_seen = []
    dock.progress.valueChanged.connect(progress_seen.append)
    task = dock.run(runner=runner)
    assert task is not None and dock.is_running()
    assert not dock.run_button.isEnabled() and dock.cancel_button.isEnabled()
    qtbot.waitUntil(lambda: not dock.is_running(), timeout=30000)
    timer.stop()

    assert runner.thread != threading.get_ident()  # the engine ran in a worker thread
    assert len(ticks) >= 25  # ~75 expected in 1.5 s: the GUI thread kept processing events
    assert max(progress_seen) == 100 and len(set(progress_seen)) > 3
    assert dock.run_button.isEnabled() and not dock.cancel_button.isEnabled()

    group = QgsProject.instance().layerTreeRoot().findGroup("building")
    assert group is not None
    layers = [n.layer() for n in group.findLayers()]
    assert len(layers) == 2 and layers == dock.last_layers
    for layer, target in zip(sorted(layers, key=lambda l: l.name()), sorted(targets, key=lambda l: l.name())):
        assert layer.providerType() == "memory" and layer.customProperty(RESULT_PROPERTY) == "building"
        assert [f.name() for f in layer.fields()] == [n for n, _ in FIELDS]
        assert layer.crs().authid() == "EPSG:4326"
        assert layer.featureCount() == 2
        assert target.name() in layer.name()
        for f in layer.getFeatures():
            assert f["class_name"] == "building" and f["source"].endswith(target.name() + ".tif")
            assert target.extent().contains(f.geometry().boundingBox())
        assert layer.renderer().symbol().color().alpha() < 255 or layer.renderer().symbol().opacity() < 1
    texts = messages(qgis_iface)
    assert any(level == Qgis.Success and "building: 2 in" in t for t, level in texts)


def test_second_run_while_running_is_refused_clearly(dock, tiles, qgis_iface, qtbot):
    prepare(dock, tiles)
    assert dock.run(runner=slow_runner(2.0)) is not None
    assert dock.run(runner=slow_runner(0.1)) is None
    assert any("already" in t and level == Qgis.Warning for t, level in messages(qgis_iface))
    qtbot.waitUntil(lambda: not dock.is_running(), timeout=30000)


def test_cancel_stops_within_seconds_and_adds_no_layer(dock, tiles, qgis_iface, qtbot):
    prepare(dock, tiles)
    n_layers = len(QgsProject.instance().mapLayers())
    task = dock.run(runner=slow_runner(20.0))
    qtbot.waitUntil(lambda: dock.progress.value() > 0, timeout=10000)
    t0 = time.time()
    dock.cancel_button.click()
    qtbot.waitUntil(lambda: not dock.is_running(), timeout=10000)
    assert time.time() - t0 < 5
    assert task.cancelled and task.result is None
    assert len(QgsProject.instance().mapLayers()) == n_layers
    assert QgsProject.instance().layerTreeRoot().findGroup("building") is None
    assert any("cancelled" in t for t, _ in messages(qgis_iface))
    assert dock.run_button.isEnabled()


def test_engine_errors_are_one_sentence_in_the_message_bar(dock, tiles, qgis_iface, qtbot):
    from virefsam.core.errors import InputError

    prepare(dock, tiles)

    def refusing(params, progress=None, is_cancelled=None):
        raise InputError("The target raster has no georeferencing: georeference it first.")

    dock.run(runner=refusing)
    qtbot.waitUntil(lambda: not dock.is_running(), timeout=10000)
    texts = messages(qgis_iface)
    assert ("The target raster has no georeferencing: georeference it first.", Qgis.Critical) in texts

    qgis_iface.messageBar().clearWidgets()
    logged = []
    QgsApplication.messageLog().messageReceived.connect(lambda msg, tag, level: logged.append((tag, msg)))

    def buggy(params, progress=None, is_cancelled=None):
        return {}["no such key"]

    dock.run(runner=buggy)
    qtbot.waitUntil(lambda: not dock.is_running(), timeout=10000)
    (text, level), = messages(qgis_iface)
    assert level == Qgis.Critical and "Traceback" not in text and "log" in text and text.count(".") <= 2
    assert any(tag == "ViRefSAM" and "KeyError" in msg for tag, msg in logged)
    assert QgsProject.instance().layerTreeRoot().findGroup("building") is None


def test_invalid_inputs_refused_before_a_task_starts(dock, tiles, qgis_iface):
    ref, targets, polygon = tiles
    dock.class_edit.setText("building")
    assert dock.run(runner=slow_runner(0.1)) is None
    assert any("reference" in t.lower() for t, _ in messages(qgis_iface))
    dock.references.add_marks(ref, [polygon])
    dock._check_all_targets(False)
    qgis_iface.messageBar().clearWidgets()
    assert dock.run(runner=slow_runner(0.1)) is None
    assert any("target" in t.lower() for t, _ in messages(qgis_iface))
    assert not dock.is_running()


# -- export -------------------------------------------------------------------------------------------------------
def test_export_result_layers_to_shapefile_and_geopackage(dock, tiles, qtbot, tmp_path):
    from virefsam.core.errors import InputError
    from virefsam.ui.export import export_layers

    prepare(dock, tiles)
    dock.run(runner=slow_runner(0.2))
    qtbot.waitUntil(lambda: not dock.is_running(), timeout=30000)
    layers = dock.layers_to_export("last")
    assert len(layers) == 2

    one = export_layers(layers[:1], str(tmp_path / "one.shp"))
    assert one == [str(tmp_path / "one.shp")]
    back = QgsVectorLayer(one[0], "back", "ogr")
    assert back.isValid() and back.featureCount() == 2 and back.crs().authid() == "EPSG:4326"
    f = next(back.getFeatures())
    assert f["class_name"] == "building" and f["ref_id"] == "ref1" and abs(f["score"] - 0.8) < 1e-9
    with pytest.raises(InputError, match="already exists"):
        export_layers(layers[:1], str(tmp_path / "one.shp"))

    both = export_layers(layers, str(tmp_path / "all.shp"))
    assert len(both) == 2 and all(os.path.exists(p) for p in both)

    gpkg = export_layers(layers, str(tmp_path / "all.gpkg"))
    assert len(gpkg) == 2
    for uri, layer in zip(gpkg, layers):
        back = QgsVectorLayer(uri, "back", "ogr")
        assert back.isValid() and back.featureCount() == layer.featureCount()
        assert back.crs() == layer.crs()
        g1 = sorted(f.geometry().asWkt(6) for f in back.getFeatures())
        g2 = sorted(f.geometry().asWkt(6) for f in layer.getFeatures())
        assert g1 == g2
    with pytest.raises(InputError, match="gpkg or .shp|.gpkg or .shp"):
        export_layers(layers, str(tmp_path / "x.csv"))


# -- the real engine ----------------------------------------------------------------------------------------------
def _pipeline_available():
    try:
        import virefsam.core.pipeline  # noqa: F401
    except ImportError:
        return False
    return True


needs_pipeline = pytest.mark.skipif(not Path(__file__).resolve().parent.parent.joinpath("core", "pipeline.py").exists(),
                                    reason="core/pipeline.py not there yet")


@needs_pipeline
def test_end_to_end_with_the_embedded_model(dock, tiles, qgis_iface, qtbot):
    """A real run: embedded SAM, training-free, reference polygon from OSM on one tile, two target tiles."""
    from virefsam.core.results import FIELDS

    ref, targets = prepare(dock, tiles)
    ticks = []
    timer = QTimer()
    timer.timeout.connect(lambda: ticks.append(1))
    timer.start(50)
    t0 = time.time()
    task = dock.run()
    assert task is not None, messages(qgis_iface)
    qtbot.waitUntil(lambda: not dock.is_running(), timeout=600000)
    timer.stop()
    elapsed = time.time() - t0
    assert task.error is None, task.error
    assert not task.cancelled
    assert len(ticks) > elapsed * 20 * 0.3  # the GUI kept running during the real run too
    layers = dock.last_layers
    assert len(layers) == 2
    group = QgsProject.instance().layerTreeRoot().findGroup("building")
    assert group is not None and {n.layer().id() for n in group.findLayers()} == {lay.id() for lay in layers}
    total = 0
    for layer in layers:
        assert [f.name() for f in layer.fields()] == [n for n, _ in FIELDS]
        assert layer.crs().authid() == "EPSG:4326"
        target = next(t for t in targets if t.name() in layer.name())
        for f in layer.getFeatures():
            total += 1
            assert f["class_name"] == "building"
            assert 0.0 <= f["score"] <= 1.0 and f["area"] > 0
            assert f.geometry().isGeosValid()
            assert target.extent().buffered(1e-7).contains(f.geometry().boundingBox())
    assert total > 0, "the embedded model found no building on two building-rich tiles"
    assert any(level == Qgis.Success for _, level in messages(qgis_iface))


@needs_pipeline
def test_gpu_out_of_memory_outside_the_tiles_is_one_clear_sentence(dock, tiles, qgis_iface, qtbot, monkeypatch):
    """INJECTED (no GPU here): torch.cuda.OutOfMemoryError while a real run puts the model together
    (ReferencePredictor, outside the tile loop, which falls back to the CPU by itself). The message bar shows
    the one sentence that says what to do, not "unexpected error"; nothing is added to the project."""
    import torch
    from virefsam.core.modeling.predictor import ReferencePredictor
    from virefsam.ui.task import GPU_OUT_OF_MEMORY

    def init_oom(self, *args, **kwargs):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 3.00 GiB (injected by the test)")

    monkeypatch.setattr(ReferencePredictor, "__init__", init_oom)
    prepare(dock, tiles)
    qgis_iface.messageBar().clearWidgets()
    n_layers = len(QgsProject.instance().mapLayers())
    task = dock.run()
    assert task is not None, messages(qgis_iface)
    qtbot.waitUntil(lambda: not dock.is_running(), timeout=300000)
    assert task.error == GPU_OUT_OF_MEMORY and task.details is None
    assert messages(qgis_iface) == [(GPU_OUT_OF_MEMORY, Qgis.Critical)]
    assert dock.status_label.text() == GPU_OUT_OF_MEMORY
    assert len(QgsProject.instance().mapLayers()) == n_layers


@needs_pipeline
def test_a_precision_the_device_cannot_run_is_one_sentence(dock, tiles, qgis_iface, qtbot):
    """fp16 on the CPU, in a real run from the dock: the engine's one sentence in the message bar, no traceback,
    no layer, and the run stops before the model is loaded."""
    prepare(dock, tiles)
    dock.precision_combo.setCurrentIndex(dock.precision_combo.findData("fp16"))
    qgis_iface.messageBar().clearWidgets()
    n_layers = len(QgsProject.instance().mapLayers())
    task = dock.run()
    assert task is not None and task.params.model.precision == "fp16"
    qtbot.waitUntil(lambda: not dock.is_running(), timeout=60000)
    sentence = "fp16 runs on CUDA GPUs only: choose fp32 (or bf16 on a CPU that supports it)."
    # refused while the inputs are checked: the run never got to "loading the model"
    assert task.error == sentence and task.details is None and task.message == "checking the inputs"
    assert messages(qgis_iface) == [(sentence, Qgis.Critical)]
    assert len(QgsProject.instance().mapLayers()) == n_layers and dock.run_button.isEnabled()


@needs_pipeline
def test_cancel_a_real_run(dock, tiles, qgis_iface, qtbot, shared_data):
    prepare(dock, tiles)
    # a bigger target so that the run lasts long enough to be cancelled in its middle
    big = QgsRasterLayer(str(shared_data / "oam_mosaics" / "zanzibar.tif"), "zanzibar")
    QgsProject.instance().addMapLayer(big)
    dock.set_targets([big])
    n_layers = len(QgsProject.instance().mapLayers())
    task = dock.run()
    assert task is not None
    qtbot.waitUntil(lambda: dock.progress.value() > 0 or not dock.is_running(), timeout=300000)
    assert dock.is_running()
    t0 = time.time()
    dock.cancel()
    qtbot.waitUntil(lambda: not dock.is_running(), timeout=60000)
    assert time.time() - t0 < 30
    assert task.cancelled and task.result is None
    assert len(QgsProject.instance().mapLayers()) == n_layers


@needs_pipeline
def test_run_to_a_geopackage_file(dock, tiles, qgis_iface, qtbot, tmp_path):
    prepare(dock, tiles)
    out = tmp_path / "buildings.gpkg"
    dock.file_radio.setChecked(True)
    dock.output_widget.setFilePath(str(out))
    task = dock.run()
    qtbot.waitUntil(lambda: not dock.is_running(), timeout=600000)
    assert task.error is None, task.error
    assert out.exists()
    layers = dock.last_layers
    assert len(layers) == 2
    for layer in layers:
        assert layer.providerType() == "ogr" and str(out) in layer.source()


def test_export_dialog_writes_the_chosen_file(dock, tiles, qtbot, tmp_path, monkeypatch, qgis_iface):
    from qgis.PyQt.QtWidgets import QFileDialog

    prepare(dock, tiles)
    dock.run(runner=slow_runner(0.2))
    qtbot.waitUntil(lambda: not dock.is_running(), timeout=30000)
    target = str(tmp_path / "exported")  # no suffix: a GeoPackage
    monkeypatch.setattr(QFileDialog, "getSaveFileName", lambda *a, **k: (target, "GeoPackage (*.gpkg)"))
    written = dock.export_dialog("all")
    assert len(written) == 2 and os.path.exists(target + ".gpkg")
    assert any("Exported 2 layer(s)" in t for t, _ in messages(qgis_iface))
    qgis_iface.setActiveLayer(dock.last_layers[0])
    monkeypatch.setattr(QFileDialog, "getSaveFileName", lambda *a, **k: (str(tmp_path / "one.shp"), ""))
    assert dock.export_dialog("selected") == [str(tmp_path / "one.shp")]


def test_engine_imports_without_triton(plugin_parent):
    """In the QGIS desktop, triton's bundled LLVM crashes next to Mesa's libLLVM: the plugin keeps triton out
    and torch / torchvision / the engine still import."""
    import subprocess
    import sys

    code = (
        "import sys; sys.path.insert(0, %r)\n"
        "from virefsam.ui.deps import guard_engine_imports\n"
        "guard_engine_imports()\n"
        "import torchvision, torch._dynamo\n"
        "from virefsam.core import pipeline\n"
        "assert sys.modules['triton'] is None\n"
        "print('ok')\n" % str(plugin_parent)
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.stdout.strip().endswith("ok"), proc.stderr[-2000:]


@needs_pipeline
def test_results_on_a_raster_without_georeferencing_land_on_it(dock, qgis_iface, qgis_project, qtbot, shared_data,
                                                               tmp_path):
    """A plain PNG (no CRS, no geotransform) loaded in QGIS, a building outlined on it, a real run: the result
    layer has no CRS like the raster (not QGIS's default EPSG:4326 of memory layers) and its polygons lie on the
    raster's buildings in QGIS's pixel frame. When the raster has a CRS in the project (QGIS's "CRS for new
    layers", or the user's choice) the result layers, memory or file, take that one."""
    import dataclasses
    import json

    import numpy as np
    import rasterio
    from qgis.core import QgsCoordinateReferenceSystem
    from rasterio import features
    from shapely import affinity, wkt
    from shapely.geometry import shape
    from virefsam.core.raster import PIXEL_FRAME
    from virefsam.core.writers import write_results
    from virefsam.ui.result_layers import add_result_layers

    base = shared_data / "oam_buildings"
    tile = "area1_OAM-1277174-1083983-21"  # Zanzibar, buildings on half of the pixels
    with rasterio.open(base / "images" / f"{tile}.tif") as src:
        data, to_px = src.read([1, 2, 3]), ~src.transform
    png = tmp_path / "plain photo.png"
    with rasterio.open(png, "w", driver="PNG", width=256, height=256, count=3, dtype="uint8") as dst:
        dst.write(data)
    layer = QgsRasterLayer(str(png), "plain photo")
    assert layer.isValid() and not layer.crs().isValid()
    assert layer.extent().toRectF().getCoords() == (0.0, -256.0, 256.0, 0.0)  # QGIS's pixel frame
    qgis_project.addMapLayer(layer)
    fc = json.loads((base / "labels_geojson" / f"{tile}.geojson").read_text())
    building = max((shape(f["geometry"]) for f in fc["features"]), key=lambda g: g.area)
    in_pixels = affinity.affine_transform(building, [to_px.a, to_px.b, to_px.d, to_px.e, to_px.c, to_px.f])
    marked = affinity.scale(in_pixels, 1, -1, origin=(0, 0))  # as drawn on the canvas: y = -row

    set_up_run(dock, layer, [QgsGeometry.fromWkt(marked.wkt)], [layer])
    task = dock.run()
    assert task is not None, messages(qgis_iface)
    qtbot.waitUntil(lambda: not dock.is_running(), timeout=600000)
    assert task.error is None, task.error
    (result_layer,) = dock.last_layers
    assert result_layer.providerType() == "memory"
    assert not result_layer.crs().isValid() and not result_layer.dataProvider().crs().isValid()
    assert result_layer.featureCount() > 0
    extent = layer.extent().buffered(1e-6)
    geoms = [wkt.loads(f.geometry().asWkt()) for f in result_layer.getFeatures()]
    assert all(extent.contains(f.geometry().boundingBox()) for f in result_layer.getFeatures())
    with rasterio.open(base / "masks" / f"{tile}.tif") as src:
        truth = src.read(1) > 0
    found = features.rasterize(geoms, out_shape=truth.shape, transform=PIXEL_FRAME) > 0
    assert (found & truth).sum() / (found | truth).sum() > 0.3  # on the raster's buildings, not mirrored

    # the raster got a CRS in the project (as the desktop's "CRS for new layers" setting may give it)
    layer.setCrs(QgsCoordinateReferenceSystem("EPSG:3857"))
    result = task.result
    (memory,) = add_result_layers(result)
    assert memory.crs().authid() == "EPSG:3857"
    # a run written to a file: the GeoPackage says "Undefined Cartesian SRS"; in QGIS, the raster's CRS
    out = str(tmp_path / "found.gpkg")
    write_results(out, result.targets)
    written = dataclasses.replace(result, output=out, params=dataclasses.replace(result.params, output=out))
    (from_file,) = add_result_layers(written)
    assert from_file.providerType() == "ogr" and from_file.crs().authid() == "EPSG:3857"
    assert from_file.featureCount() == result_layer.featureCount()
    layer.setCrs(QgsCoordinateReferenceSystem())
    (from_file,) = add_result_layers(written)
    assert not from_file.crs().isValid()
    assert np.allclose(from_file.extent().toRectF().getCoords(), result_layer.extent().toRectF().getCoords())
