"""Several classes in one run from the dock, in real QGIS: the class list, one layer with both classes styled by
class, GeoPackage / Shapefile export keeping the class attribute. Real engine (embedded SAM, training-free on one
1024 px tile), real rasters (the demo's cut-outs)."""

from collections import Counter

import pytest

pytest.importorskip("qgis.gui")

from osgeo import ogr  # noqa: E402
from qgis.core import QgsCategorizedSymbolRenderer, QgsGeometry, QgsRasterLayer  # noqa: E402
from qgis_iface import set_up_run  # noqa: E402

GROUND = "POLYGON ((4368380 -673950, 4368390 -673950, 4368390 -673960, 4368380 -673960, 4368380 -673950))"


def test_two_class_run_writes_one_layer_with_both_classes(dock, qgis_project, virefsam_pkg, qtbot, tmp_path):
    from virefsam.core.demo import DEMO
    from virefsam.core.segment_cli import read_geometries
    from virefsam.ui.export import export_layers

    ref = QgsRasterLayer(str(DEMO / "reference.tif"), "reference")
    tgt = QgsRasterLayer(str(DEMO / "target_kampala.tif"), "kampala")
    qgis_project.addMapLayers([ref, tgt])
    fg, _, _ = read_geometries(str(DEMO / "reference_houses.geojson"))
    set_up_run(dock, ref, [QgsGeometry.fromWkt(w) for w in fg], [tgt], include_reference=False)
    dock.tile_spin.setValue(1024)
    dock.overlap_spin.setValue(128)
    assert not dock.remove_class_button.isEnabled()

    assert dock.add_class("ground") == 1  # a second class, shown at once, without marks
    assert dock.references.total_marks() == 0 and dock.class_edit.text() == "ground"
    dock.references.add_marks(ref, [QgsGeometry.fromWkt(GROUND)])
    assert [dock.class_combo.itemText(i) for i in range(dock.class_combo.count())] == ["building", "ground"]
    dock.show_class(0)  # each class keeps its own marks
    assert dock.class_edit.text() == "building" and dock.references.total_marks() == 4
    dock.show_class(1)
    assert dock.references.total_marks() == 1

    params = dock.build_params()
    assert [c.name for c in params.class_specs()] == ["building", "ground"] and params.references == ()
    task = dock.run()
    assert task is not None
    qtbot.waitUntil(lambda: not dock.is_running(), timeout=300000)
    assert not task.error, task.error
    assert len(dock.last_layers) == 1  # one layer per target, with both classes
    layer = dock.last_layers[0]
    counts = Counter(f["class_name"] for f in layer.getFeatures())
    assert counts["building"] > 5 and counts["ground"] > 0, counts
    renderer = layer.renderer()
    assert isinstance(renderer, QgsCategorizedSymbolRenderer) and renderer.classAttribute() == "class_name"
    assert [c.value() for c in renderer.categories()] == ["building", "ground"]
    colors = {c.value(): c.symbol().color().name() for c in renderer.categories()}
    assert colors["building"] != colors["ground"]

    for ext in ("gpkg", "shp"):  # export keeps the attribute
        path = str(tmp_path / f"both.{ext}")
        export_layers([layer], path, overwrite=True)
        ds = ogr.Open(path if ext == "gpkg" else str(tmp_path))
        got = Counter(f.GetField("class_name") for i in range(ds.GetLayerCount()) for f in ds.GetLayer(i))
        assert got == counts, (ext, got)
        ds = None

    dock.remove_class()  # back to one class: the run is the one class's again
    assert dock.class_edit.text() == "building" and dock.build_params().classes == ()


def test_one_layer_per_class_from_the_dock_into_a_geopackage(dock, qgis_project, virefsam_pkg, qtbot, tmp_path):
    """"One layer per class": a two-class run written to a GeoPackage gives one layer per class (one table each),
    each in its class's group, with that class's polygons only; the layers export to GeoPackage and Shapefile."""
    from virefsam.core.demo import DEMO
    from virefsam.core.segment_cli import read_geometries
    from virefsam.ui.export import export_layers
    from virefsam.ui.result_layers import RESULT_PROPERTY

    ref = QgsRasterLayer(str(DEMO / "reference.tif"), "reference")
    tgt = QgsRasterLayer(str(DEMO / "target_kampala.tif"), "kampala")
    qgis_project.addMapLayers([ref, tgt])
    fg, _, _ = read_geometries(str(DEMO / "reference_houses.geojson"))
    set_up_run(dock, ref, [QgsGeometry.fromWkt(w) for w in fg], [tgt], include_reference=False)
    dock.tile_spin.setValue(1024)
    dock.overlap_spin.setValue(128)
    dock.add_class("ground")
    dock.references.add_marks(ref, [QgsGeometry.fromWkt(GROUND)])
    assert not dock.layer_per_class_check.isChecked()  # the default: one layer per target
    dock.layer_per_class_check.setChecked(True)
    out = tmp_path / "classes.gpkg"
    dock.file_radio.setChecked(True)
    dock.output_widget.setFilePath(str(out))
    assert dock.build_params().layer_per_class

    task = dock.run()
    assert task is not None, [i.text() for i in dock.iface.messageBar().items()]
    qtbot.waitUntil(lambda: not dock.is_running(), timeout=300000)
    assert not task.error, task.error
    layers = dock.last_layers
    assert [(lay.name(), lay.customProperty(RESULT_PROPERTY)) for lay in layers] == [
        ("building - target_kampala", "building"), ("ground - target_kampala", "ground")]
    counts = {}
    for layer in layers:
        cls = layer.customProperty(RESULT_PROPERTY)
        assert layer.providerType() == "ogr" and f"layername=target_kampala_{cls}" in layer.source()
        got = Counter(f["class_name"] for f in layer.getFeatures())
        assert set(got) == {cls}, got
        counts[cls] = got[cls]
        group = qgis_project.layerTreeRoot().findGroup(cls)
        assert group is not None and group.findLayer(layer.id()) is not None
    assert counts["building"] > 5 and counts["ground"] > 0, counts
    ds = ogr.Open(str(out))
    assert sorted(ds.GetLayer(i).GetName() for i in range(ds.GetLayerCount())) == [
        "target_kampala_building", "target_kampala_ground"]
    ds = None

    for ext in ("gpkg", "shp"):  # export: one layer (table or file) per class
        path = str(tmp_path / "export" / f"per_class.{ext}")
        (tmp_path / "export").mkdir(exist_ok=True)
        written = export_layers(layers, path, overwrite=True)
        assert len(written) == 2, written
        got = {}
        for w in written:
            ds = ogr.Open(w.split("|")[0])
            lyr = ds.GetLayerByName(w.split("layername=")[1]) if "layername=" in w else ds.GetLayer(0)
            for f in lyr:
                got[f.GetField("class_name")] = got.get(f.GetField("class_name"), 0) + 1
            lyr, ds = None, None
        assert got == counts, (ext, got)
