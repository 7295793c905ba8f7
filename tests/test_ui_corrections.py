"""Correcting a result from the dock, in real QGIS: select result polygons, "Not building" (button and the layer's
context menu), undo, the next run; a bow-tie reference polygon drawn in the dock.

Real engine (the embedded SAM, the shipped adapters), real rasters: the demo's reference cut-out and the Kampala
window of ``python -m core corrections`` with its OpenStreetMap footprints.
"""

import pytest

pytest.importorskip("qgis.gui")

from qgis.core import QgsGeometry, QgsRasterLayer  # noqa: E402
from qgis_iface import set_up_run  # noqa: E402


@pytest.fixture
def scene(qgis_project, shared_data, tmp_path, virefsam_pkg):
    """The demo's reference raster with its four houses, and the Kampala window (target) with its truth VRT."""
    from virefsam.core import corrections
    from virefsam.core.demo import DEMO
    from virefsam.core.segment_cli import read_geometries

    target, truth = corrections.scene_window("kampala", shared_data / "oam_mosaics", tmp_path)
    ref = QgsRasterLayer(str(DEMO / "reference.tif"), "reference")
    tgt = QgsRasterLayer(target, "kampala")
    assert ref.isValid() and tgt.isValid()
    qgis_project.addMapLayers([ref, tgt])
    fg, _, _ = read_geometries(str(DEMO / "reference_houses.geojson"))  # EPSG:3857, the raster's CRS
    return ref, tgt, [QgsGeometry.fromWkt(w) for w in fg], truth


def _run(dock, qtbot):
    task = dock.run()
    assert task is not None, [i.text() for i in dock.iface.messageBar().items()]
    qtbot.waitUntil(lambda: not dock.is_running(), timeout=300000)
    assert not task.error, task.error
    assert len(dock.last_layers) == 1
    return dock.last_layers[0]


def _shapes(layer):
    from shapely import wkt

    return {f.id(): wkt.loads(f.geometry().asWkt()) for f in layer.getFeatures()}


def test_not_building_on_selected_result_polygons_is_used_by_the_next_run(dock, scene, qgis_iface, qtbot):
    from virefsam.core import corrections

    ref, tgt, houses, truth = scene
    set_up_run(dock, ref, houses, [tgt], include_reference=False, mode="virefsam")
    dock.tile_spin.setValue(1024)
    dock.overlap_spin.setValue(128)
    first = _run(dock, qtbot)

    # the analyst's picks: the five largest polygons off the footprints (the rule of `python -m core corrections`)
    mask, transform, _ = corrections._truth(truth)
    shapes = _shapes(first)
    wrong = corrections.false_positives(list(shapes.values()), mask, transform, 5)
    ids = [fid for fid, g in shapes.items() if any(g is w for w in wrong)]
    assert len(ids) == 5
    first.selectByIds(ids)
    qgis_iface.setActiveLayer(first)

    # "Not building" is offered in the result layer's context menu and as a dock button
    menu = qgis_iface.layer_context_actions(first)
    assert dock.not_class_action in menu and dock.more_like_action in menu
    assert dock.not_class_action.text() == "Not building" == dock.not_class_button.text()
    assert qgis_iface.layer_context_actions(ref) == []

    dock.not_class_button.click()
    negs = dock.references.negatives()
    assert len(negs) == 1 and len(negs[0].marks) == 5 and negs[0].layer_id == tgt.id()
    rows = [dock.reference_list.item(i).text() for i in range(dock.reference_list.count())]
    assert "neg1: 5 negative (not the class) on kampala" in rows
    assert "negative example" in dock.reference_status.text()
    dock.undo_button.click()  # undo takes them back ...
    assert dock.references.negatives() == []
    dock.not_class_action.trigger()  # ... and the context menu marks them again
    assert len(dock.references.negatives()[0].marks) == 5

    params = dock.build_params()
    neg_specs = [r for r in params.references if not r.foreground]
    assert len(neg_specs) == 1 and len(neg_specs[0].background) == 5
    second = _run(dock, qtbot)
    after = list(_shapes(second).values())
    hits = sum(1 for g in wrong if any(g.buffer(-0.05).intersects(a) for a in after))
    assert hits <= 1, hits  # measured: none of the five places has a polygon any more
    assert len(after) > 0.5 * len(shapes)  # buildings are still found
    assert "5 negative examples (marked 'not building')" in dock.status_label.text()


def test_more_like_this_adds_a_shot_and_a_foreign_class_is_refused(dock, scene, qgis_iface, qtbot):
    from virefsam.core.results import Feature, RunResult, TargetResult
    from virefsam.ui.result_layers import add_result_layers
    from shapely.geometry import box

    ref, tgt, houses, _ = scene
    set_up_run(dock, ref, houses, [tgt], include_reference=False, mode=None)
    e = tgt.extent()
    poly = box(e.xMinimum() + 10, e.yMinimum() + 10, e.xMinimum() + 20, e.yMinimum() + 20)
    params = dock.build_params()
    result = RunResult(params=params, targets=[TargetResult(
        raster=tgt.source(), crs_wkt=tgt.crs().toWkt(),
        features=[Feature(poly, {"class_name": "building", "source": tgt.source()})])])
    layer = add_result_layers(result)[0]
    layer.selectAll()
    assert dock.mark_selected_results(negative=False, layer=layer) == 1
    shot = [r for r in dock.references.non_empty() if r.layer_id == tgt.id()]
    assert len(shot) == 1 and len(shot[0].foreground) == 1
    assert len(dock.build_params().references) == 2  # the houses and the new shot

    dock.class_edit.setText("tree")
    assert dock.mark_selected_results(negative=True, layer=layer) == 0
    assert "were found as 'building'" in dock.reference_status.text()


def test_bow_tie_reference_polygon_drawn_in_the_dock_gives_a_result_and_the_note(dock, scene, qgis_iface, qtbot):
    ref, tgt, houses, _ = scene
    b = houses[0].boundingBox()
    x0, y0, x1, y1 = b.xMinimum(), b.yMinimum(), b.xMaximum(), b.yMaximum()
    bow = QgsGeometry.fromWkt(f"POLYGON (({x0} {y0}, {x1} {y1}, {x1} {y0}, {x0} {y1}, {x0} {y0}))")
    assert not bow.isGeosValid()
    set_up_run(dock, ref, [bow], [tgt], include_reference=False, mode="training_free")
    layer = _run(dock, qtbot)
    assert layer.featureCount() > 0
    assert "invalid polygon was repaired (self-intersection)" in dock.status_label.text()


def test_corrections_and_classes_refused_with_one_sentence(dock, scene, qgis_iface, qgis_project):
    """The dock's refusals (docs/FAULTS.md): not a result layer, nothing selected, the result's raster removed;
    a second class without a name. No run: a result layer made from a RunResult, as the dock makes it."""
    from shapely.geometry import box
    from virefsam.core.errors import InputError
    from virefsam.core.results import Feature, RunResult, TargetResult
    from virefsam.ui.result_layers import add_result_layers

    ref, tgt, houses, _ = scene
    set_up_run(dock, ref, houses, [tgt], include_reference=False, mode=None)
    e = tgt.extent()
    poly = box(e.xMinimum() + 10, e.yMinimum() + 10, e.xMinimum() + 20, e.yMinimum() + 20)
    result = RunResult(params=dock.build_params(), targets=[TargetResult(
        raster=tgt.source(), crs_wkt=tgt.crs().toWkt(),
        features=[Feature(poly, {"class_name": "building", "source": tgt.source()})])])
    layer = add_result_layers(result)[0]
    before = dock.references.total_marks()

    qgis_iface.setActiveLayer(ref)  # a raster, not a result layer
    assert dock.mark_selected_results(negative=True) == 0
    assert dock.reference_status.text() == \
        "Select polygons of a ViRefSAM result layer (make it the active layer) first."
    qgis_iface.setActiveLayer(layer)
    layer.removeSelection()
    dock.not_class_button.click()
    assert dock.reference_status.text() == \
        f"No polygon of '{layer.name()}' is selected: select the ones to correct."
    layer.selectAll()
    qgis_project.removeMapLayer(tgt.id())  # the raster the polygons were found in is gone
    assert dock.mark_selected_results(negative=False, layer=layer) == 0
    assert dock.reference_status.text() == \
        "The raster 'kampala.vrt' of this result is not in the project any more: add it again to correct its polygons."
    assert dock.references.total_marks() == before  # nothing was marked

    dock.add_class("")  # a second class with a mark but no name
    dock.references.add_marks(ref, houses[:1])
    with pytest.raises(InputError, match=r"^A class has no name: type the name of every class \(e\.g\. building, "
                                         r"tree\)\.$"):
        dock.build_params()
    assert dock.run() is None  # the run does not start; the sentence goes to the message bar
    assert any("A class has no name" in i.text() for i in qgis_iface.messageBar().items())
