"""The references of the class being marked: K references (K-shot), each on one raster, each a list of marks.

A mark is a geometry in its reference raster's CRS (lines = scribbles, polygons = drawn masks) plus a flag for
background. Every change goes through :class:`ReferenceSet` so that it can be undone (adding marks, clearing
a reference, removing a reference) and so that the dock and the canvas overlay redraw on ``changed``.
:meth:`ReferenceDraft.to_spec` copies a reference into the engine's frozen :class:`ReferenceSpec` (WKT strings,
raster path, CRS string): nothing of QGIS travels further.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Optional, Tuple

from qgis.core import (
    QgsCoordinateReferenceSystem,
    QgsCoordinateTransform,
    QgsGeometry,
    QgsProject,
    QgsProviderRegistry,
    QgsRasterLayer,
    QgsWkbTypes,
)
from qgis.PyQt.QtCore import QObject, pyqtSignal

WEB_PROVIDERS = ("wms", "wcs", "xyz", "arcgismapserver", "arcgisfeatureserver", "vectortile", "mbtiles")


def raster_path(layer) -> Optional[str]:
    """The file (or GDAL dataset string) behind a raster layer, or None for web layers / non-GDAL providers."""
    if not isinstance(layer, QgsRasterLayer) or layer.providerType() != "gdal":
        return None
    parts = QgsProviderRegistry.instance().decodeUri("gdal", layer.source())
    path = parts.get("path") or layer.source()
    if parts.get("layerName"):  # a raster table of a GeoPackage: GDAL's own subdataset syntax
        return f"GPKG:{path}:{parts['layerName']}"
    return path


def web_layer_reason(layer) -> Optional[str]:
    """Why a raster layer cannot be a target or reference (None when it can)."""
    if not isinstance(layer, QgsRasterLayer):
        return "not a raster layer"
    if layer.providerType() != "gdal":
        return (
            f"'{layer.name()}' is a web or service layer ({layer.providerType()}): ViRefSAM reads pixels from files; "
            "save it as a GeoTIFF first (right-click > Export > Save As...)."
        )
    return None


def crs_string(crs: QgsCoordinateReferenceSystem) -> str:
    """An authority id when there is one (``EPSG:3857``), else GDAL-flavoured WKT."""
    if not crs.isValid():
        return ""
    if crs.authid():
        return crs.authid()
    return crs.toWkt(QgsCoordinateReferenceSystem.WKT_PREFERRED_GDAL)


@dataclass
class Mark:
    geometry: QgsGeometry  # in the reference raster's CRS
    background: bool = False


@dataclass
class ReferenceDraft:
    ref_id: str
    layer_id: str = ""
    raster: str = ""  # path of the raster, see raster_path()
    layer_name: str = ""
    crs: QgsCoordinateReferenceSystem = field(default_factory=QgsCoordinateReferenceSystem)
    marks: List[Mark] = field(default_factory=list)
    on_target: bool = False  # made from result polygons ("Not <class>" / "More like this"): the raster stays a target

    @property
    def foreground(self) -> List[QgsGeometry]:
        return [m.geometry for m in self.marks if not m.background]

    @property
    def background(self) -> List[QgsGeometry]:
        return [m.geometry for m in self.marks if m.background]

    def is_empty(self) -> bool:
        return not self.marks

    @property
    def negative(self) -> bool:
        """Background marks only: negative examples ("not this class"), e.g. result polygons marked wrong."""
        return bool(self.marks) and not self.foreground

    def describe(self) -> str:
        fg, bg = len(self.foreground), len(self.background)
        where = self.layer_name or "no raster yet"
        if self.negative:
            return f"{self.ref_id}: {bg} negative (not the class) on {where}"
        return f"{self.ref_id}: {fg} foreground, {bg} background on {where}"

    def to_spec(self):
        """The engine's ReferenceSpec (plain strings only)."""
        from ..core.params import ReferenceSpec

        return ReferenceSpec(
            raster=self.raster,
            foreground=tuple(g.asWkt() for g in self.foreground),
            background=tuple(g.asWkt() for g in self.background),
            crs=crs_string(self.crs),
            ref_id=self.ref_id,
        )

    def clone(self) -> "ReferenceDraft":
        return ReferenceDraft(
            self.ref_id,
            self.layer_id,
            self.raster,
            self.layer_name,
            QgsCoordinateReferenceSystem(self.crs),
            [Mark(QgsGeometry(m.geometry), m.background) for m in self.marks],
            self.on_target,
        )


class ReferenceSet(QObject):
    """The K references of one class, the current one, and an undo stack of snapshots."""

    changed = pyqtSignal()

    MAX_UNDO = 100

    def __init__(self, parent=None) -> None:
        super().__init__(parent)
        self.references: List[ReferenceDraft] = [ReferenceDraft("ref1")]
        self.current = 0
        self._undo: List[Tuple[List[ReferenceDraft], int]] = []

    # -- queries ------------------------------------------------------------------------------------------------
    @property
    def current_reference(self) -> ReferenceDraft:
        return self.references[self.current]

    def non_empty(self) -> List[ReferenceDraft]:
        """References with foreground marks (examples of the class)."""
        return [r for r in self.references if r.foreground]

    def negatives(self) -> List[ReferenceDraft]:
        """References with background marks only (negative examples)."""
        return [r for r in self.references if r.negative]

    def usable(self) -> List[ReferenceDraft]:
        """What a run takes: the references with foreground and the negative ones."""
        return [r for r in self.references if r.marks]

    def total_marks(self) -> int:
        return sum(len(r.marks) for r in self.references)

    def can_undo(self) -> bool:
        return bool(self._undo)

    # -- changes (all undoable) ---------------------------------------------------------------------------------
    def _snapshot(self) -> None:
        self._undo.append(([r.clone() for r in self.references], self.current))
        del self._undo[: -self.MAX_UNDO]

    def _next_id(self, prefix: str = "ref") -> str:
        used = {r.ref_id for r in self.references}
        i = 1
        while f"{prefix}{i}" in used:
            i += 1
        return f"{prefix}{i}"

    def add_result_marks(self, layer: QgsRasterLayer, geometries: List[QgsGeometry], negative: bool) -> int:
        """Result polygons (in ``layer``'s CRS) as marks on the raster they were found in; one undo step.

        ``negative``: "Not <class>": background marks of a negative reference on that raster (``negN``), used
        as negative examples; else "More like this": foreground marks of a reference on that raster (one more
        shot). Marks of the same kind on the same raster go to the same reference; the current reference does
        not change. Returns how many geometries were added."""
        geometries = [QgsGeometry(g) for g in geometries if g is not None and not g.isEmpty()]
        if not geometries:
            return 0
        self._snapshot()
        ref = next((r for r in self.references if r.layer_id == layer.id() and r.marks and r.on_target
                    and r.negative == negative), None)
        if ref is None:
            if self.current_reference.is_empty() and not negative:
                ref = self.current_reference
            else:
                ref = ReferenceDraft(self._next_id("neg" if negative else "ref"))
                self.references.append(ref)
            ref.layer_id = layer.id()
            ref.layer_name = layer.name()
            ref.raster = raster_path(layer) or layer.source()
            ref.crs = QgsCoordinateReferenceSystem(layer.crs())
            ref.on_target = True
        ref.marks.extend(Mark(g, negative) for g in geometries)
        self.changed.emit()
        return len(geometries)

    def add_marks(self, layer: QgsRasterLayer, geometries: List[QgsGeometry], background: bool = False) -> int:
        """Add geometries (already in ``layer``'s CRS) to the current reference; one undo step.

        The current reference belongs to the raster of its first mark: marks on another raster start a new
        reference (a second shot) automatically. Returns how many geometries were added.
        """
        geometries = [QgsGeometry(g) for g in geometries if g is not None and not g.isEmpty()]
        if not geometries:
            return 0
        self._snapshot()
        ref = self.current_reference
        if ref.marks and ref.layer_id != layer.id():
            self.references.append(ReferenceDraft(self._next_id()))
            self.current = len(self.references) - 1
            ref = self.current_reference
        if not ref.marks:
            ref.layer_id = layer.id()
            ref.layer_name = layer.name()
            ref.raster = raster_path(layer) or layer.source()
            ref.crs = QgsCoordinateReferenceSystem(layer.crs())
        ref.marks.extend(Mark(g, background) for g in geometries)
        self.changed.emit()
        return len(geometries)

    def new_reference(self) -> None:
        """Start another reference (K-shot); an empty current reference is reused."""
        if self.current_reference.is_empty():
            return
        self._snapshot()
        self.references.append(ReferenceDraft(self._next_id()))
        self.current = len(self.references) - 1
        self.changed.emit()

    def set_current(self, index: int) -> None:
        if 0 <= index < len(self.references) and index != self.current:
            self.current = index
            self.changed.emit()

    def clear_current(self) -> None:
        if self.current_reference.is_empty():
            return
        self._snapshot()
        self.current_reference.marks = []
        self.changed.emit()

    def remove_current(self) -> None:
        self._snapshot()
        del self.references[self.current]
        if not self.references:
            self.references = [ReferenceDraft("ref1")]
        self.current = min(self.current, len(self.references) - 1)
        self.changed.emit()

    def clear_all(self) -> None:
        if self.total_marks() == 0 and len(self.references) == 1:
            return
        self._snapshot()
        self.references = [ReferenceDraft("ref1")]
        self.current = 0
        self.changed.emit()

    def take_state(self):
        """The whole state (references, current, undo stack) for another class to use this set meanwhile."""
        return ([r.clone() for r in self.references], self.current, list(self._undo))

    def load_state(self, state=None) -> None:
        """Back to a state of :meth:`take_state` (None: an empty class); emits ``changed``."""
        if state is None:
            state = ([ReferenceDraft("ref1")], 0, [])
        refs, current, undo = state
        self.references, self.current, self._undo = [r.clone() for r in refs], current, list(undo)
        self.changed.emit()

    def undo(self) -> bool:
        if not self._undo:
            return False
        self.references, self.current = self._undo.pop()
        self.changed.emit()
        return True

    def forget_layer(self, layer_id: str) -> None:
        """A layer was removed from the project: its references cannot be used any more (not undoable)."""
        kept = [r for r in self.references if r.layer_id != layer_id or r.is_empty()]
        if len(kept) != len(self.references):
            self.references = kept or [ReferenceDraft("ref1")]
            self.current = min(self.current, len(self.references) - 1)
            self._undo = []
            self.changed.emit()


def geometries_from_features(features, source_crs, layer: QgsRasterLayer) -> Tuple[List[QgsGeometry], int]:
    """Polygon / line geometries of features, transformed to the raster layer's CRS; also how many were skipped
    (points, empty geometries)."""
    out, skipped = [], 0
    ct = None
    if source_crs.isValid() and layer.crs().isValid() and source_crs != layer.crs():
        ct = QgsCoordinateTransform(source_crs, layer.crs(), QgsProject.instance())
    for f in features:
        g = QgsGeometry(f.geometry())
        if g.isEmpty() or g.type() not in (QgsWkbTypes.PolygonGeometry, QgsWkbTypes.LineGeometry):
            skipped += 1
            continue
        if ct is not None:
            g.transform(ct)
        out.append(g)
    return out, skipped


__all__ = [
    "Mark",
    "ReferenceDraft",
    "ReferenceSet",
    "raster_path",
    "web_layer_reason",
    "crs_string",
    "geometries_from_features",
]
