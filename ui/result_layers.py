"""Result layers: one memory layer per target raster, grouped under the class name in the layer tree (one layer
per target and class, each under its class's group, when the run has ``layer_per_class``).

Created in the main thread from a :class:`core.results.RunResult` (shapely polygons + attribute dicts, CRS as
WKT). Fields follow :data:`core.results.FIELDS`; the style is a semi-transparent fill in a colour derived from
the class name, so two classes are told apart at a glance.

A raster without georeferencing (a plain PNG, a GeoTIFF without CRS) gives polygons in QGIS's pixel frame of that
raster (x = column, y = -row) and no CRS. Their layer gets the CRS the raster layer has in the project: none
(invalid) as loaded, or whatever QGIS or the user gave it; with no such layer in the project, explicitly none.
Never QGIS's default: a memory layer without a CRS in its URI is EPSG:4326 in QGIS 3, and a layer with an
invalid CRS is validated (the "CRS for new layers" setting) unless told not to; both would put the polygons
somewhere else than the raster.
"""

from __future__ import annotations

import hashlib
import os
from typing import List, Optional, Tuple

from qgis.core import (
    QgsCoordinateReferenceSystem,
    QgsFeature,
    QgsField,
    QgsFields,
    QgsFillSymbol,
    QgsGeometry,
    QgsLayerTreeGroup,
    QgsProject,
    QgsRasterLayer,
    QgsSingleSymbolRenderer,
    QgsVectorLayer,
)
from qgis.PyQt.QtCore import QVariant
from qgis.PyQt.QtGui import QColor

# set on every result layer, so that the dock (export) can find them again
RESULT_PROPERTY = "virefsam/result"
SOURCE_PROPERTY = "virefsam/source"

_QVARIANT = {str: QVariant.String, float: QVariant.Double, int: QVariant.LongLong, bool: QVariant.Bool}


def class_color(class_name: str) -> QColor:
    h = int(hashlib.sha1(class_name.encode("utf-8")).hexdigest()[:6], 16)
    return QColor.fromHsv(h % 360, 200, 235)


def result_fields() -> QgsFields:
    from ..core.results import FIELDS

    fields = QgsFields()
    for name, typ in FIELDS:
        fields.append(QgsField(name, _QVARIANT.get(typ, QVariant.String)))
    return fields


def _fill(c: QColor) -> QgsFillSymbol:
    return QgsFillSymbol.createSimple(
        {
            "color": f"{c.red()},{c.green()},{c.blue()},90",
            "outline_color": f"{c.red()},{c.green()},{c.blue()},255",
            "outline_width": "0.5",
            "outline_style": "solid",
        }
    )


def style_layer(layer: QgsVectorLayer, class_name: str, classes=None) -> None:
    """One colour per class (from its name): a single symbol, or with several ``classes`` (names) one category
    of the ``class_name`` attribute each."""
    if classes and len(classes) > 1:
        from qgis.core import QgsCategorizedSymbolRenderer, QgsRendererCategory

        cats = [QgsRendererCategory(name, _fill(class_color(name)), name) for name in classes]
        layer.setRenderer(QgsCategorizedSymbolRenderer("class_name", cats))
        return
    c = class_color(class_name)
    symbol = QgsFillSymbol.createSimple(
        {
            "color": f"{c.red()},{c.green()},{c.blue()},90",
            "outline_color": f"{c.red()},{c.green()},{c.blue()},255",
            "outline_width": "0.5",
            "outline_style": "solid",
        }
    )
    layer.setRenderer(QgsSingleSymbolRenderer(symbol))


def result_group(class_name: str, project: Optional[QgsProject] = None) -> QgsLayerTreeGroup:
    project = project or QgsProject.instance()
    root = project.layerTreeRoot()
    group = root.findGroup(class_name)
    if group is None:
        group = root.insertGroup(0, class_name)
    return group


def _same_file(a: str, b: str) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return os.path.normcase(os.path.abspath(a)) == os.path.normcase(os.path.abspath(b))


def target_crs(target, project: Optional[QgsProject] = None) -> QgsCoordinateReferenceSystem:
    """The CRS of a target's polygons in QGIS: the raster's CRS; for a raster without one, the CRS its layer has in
    the project (see the module docstring), else an explicitly invalid CRS (no CRS: pixel coordinates)."""
    if target.crs_wkt:
        crs = QgsCoordinateReferenceSystem.fromWkt(target.crs_wkt)
        if not crs.isValid():
            crs = QgsCoordinateReferenceSystem(target.crs_wkt)  # an authority string
        return crs
    from .references import raster_path

    project = project or QgsProject.instance()
    for layer in project.mapLayers().values():
        if isinstance(layer, QgsRasterLayer):
            path = raster_path(layer)
            if path and _same_file(path, target.raster):
                return layer.crs()
    return QgsCoordinateReferenceSystem()


def _no_validation() -> QgsVectorLayer.LayerOptions:
    options = QgsVectorLayer.LayerOptions()
    options.skipCrsValidation = True  # an invalid CRS stays invalid: no "CRS for new layers", no dialog
    return options


def layer_for_target(target, class_name: str, project: Optional[QgsProject] = None, classes=None) -> QgsVectorLayer:
    """A memory layer holding one TargetResult's polygons."""
    from ..core.results import FIELDS

    crs = target_crs(target, project)
    stem = os.path.splitext(os.path.basename(target.raster))[0]
    if crs.isValid():
        layer = QgsVectorLayer("MultiPolygon", f"{class_name} - {stem}", "memory")
    else:  # "crs=" (empty): no CRS; without it the memory provider would say EPSG:4326
        layer = QgsVectorLayer("MultiPolygon?crs=", f"{class_name} - {stem}", "memory", _no_validation())
    layer.setCrs(crs)
    provider = layer.dataProvider()
    provider.addAttributes(result_fields().toList())
    layer.updateFields()
    features = []
    names = [n for n, _ in FIELDS]
    for feat in target.features:
        geom = QgsGeometry.fromWkt(feat.geometry.wkt)
        if geom.isNull() or geom.isEmpty():
            continue
        geom.convertToMultiType()
        f = QgsFeature(layer.fields())
        f.setGeometry(geom)
        f.setAttributes([feat.attributes.get(n) for n in names])
        features.append(f)
    provider.addFeatures(features)
    layer.updateExtents()
    layer.setCustomProperty(RESULT_PROPERTY, class_name)
    layer.setCustomProperty(SOURCE_PROPERTY, target.raster)
    style_layer(layer, class_name, classes)
    return layer


def _layers(result) -> List[Tuple[str, object]]:
    """(the layer's class, the TargetResult it shows) for each layer of ``result``: one per target (the run's
    class name), or one per target and class (``layer_per_class``), in the order of ``core.writers.layer_names``."""
    from ..core.writers import split_by_class

    if getattr(result.params, "layer_per_class", False):
        return split_by_class(result.targets, [c.name for c in result.params.class_specs()])
    return [(result.params.class_name, t) for t in result.targets]


def _file_uris(result) -> List[Optional[str]]:
    """The OGR URI of each layer (:func:`_layers`) in the written output (None where it cannot be found)."""
    from ..core.writers import layer_names, output_paths, unique_layer_names

    params = result.params
    per_class = [c.name for c in params.class_specs()] if getattr(params, "layer_per_class", False) else None
    raw = layer_names([t.raster for t in result.targets], per_class)
    if params.output_format == "shp":
        paths = output_paths(params.output, raw, "shp")
        return [p if os.path.exists(p) else None for p in paths]
    # GeoPackage: one table per layer, named as core.writers names them (file stem, _2, _3 for repeats)
    names = unique_layer_names(raw)
    path = result.output
    try:
        from osgeo import ogr

        ds = ogr.Open(path)
        present = {ds.GetLayer(i).GetName() for i in range(ds.GetLayerCount())} if ds is not None else set()
        ds = None
    except Exception:  # noqa: BLE001
        present = set()
    return [f"{path}|layername={n}" if n in present else None for n in names]


def add_result_layers(result, project: Optional[QgsProject] = None) -> List[QgsVectorLayer]:
    """Layers for every processed target of ``result``, added to the project under the class name.

    When the run wrote a file, the layers are that file's layers (they stay with the project); otherwise they are
    memory layers (temporary: export them to keep them)."""
    project = project or QgsProject.instance()
    per_class = getattr(result.params, "layer_per_class", False)
    # several classes in one layer: styled by class; one layer per class: one colour each
    classes = None if per_class else [c.name for c in result.params.class_specs()]
    plan = _layers(result)
    uris = _file_uris(result) if result.output else [None] * len(plan)
    layers, groups = [], []
    for (class_name, target), uri in zip(plan, uris):
        if target.skipped is not None:
            continue
        layer = None
        if uri:
            stem = os.path.splitext(os.path.basename(target.raster))[0]
            if target.crs_wkt:
                layer = QgsVectorLayer(uri, f"{class_name} - {stem}", "ogr")
            else:  # the file says "Undefined Cartesian SRS": in QGIS, the raster's CRS (see the module docstring)
                layer = QgsVectorLayer(uri, f"{class_name} - {stem}", "ogr", _no_validation())
                layer.setCrs(target_crs(target, project))
            if layer.isValid():
                layer.setCustomProperty(RESULT_PROPERTY, class_name)
                layer.setCustomProperty(SOURCE_PROPERTY, target.raster)
                style_layer(layer, class_name, classes)
            else:
                layer = None
        layers.append(layer or layer_for_target(target, class_name, project, classes))
        groups.append(class_name)
    for layer, class_name in zip(layers, groups):
        project.addMapLayer(layer, False)
        result_group(class_name, project).addLayer(layer)
    return layers


def result_layers(project: Optional[QgsProject] = None) -> List[QgsVectorLayer]:
    """Every ViRefSAM result layer in the project, in layer-tree order."""
    project = project or QgsProject.instance()
    out = []
    for node in project.layerTreeRoot().findLayers():
        layer = node.layer()
        if isinstance(layer, QgsVectorLayer) and layer.customProperty(RESULT_PROPERTY):
            out.append(layer)
    return out
