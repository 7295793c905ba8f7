"""What the references look like on the canvas: rubber bands for the marks and for the dense reference mask.

Canvas items only (no layer is added to the project, nothing is saved with it): green lines/polygons for
foreground marks, red for background, the current reference drawn stronger than the others, and the dense
mask that the engine derives from the marks (``core.reference.build_reference``) as a semi-transparent fill.
:meth:`ReferenceOverlay.remove` takes every item off the canvas (plugin unload).
"""

from __future__ import annotations

from typing import List, Optional

from qgis.core import QgsGeometry, QgsWkbTypes
from qgis.gui import QgsRubberBand
from qgis.PyQt.QtGui import QColor

from .map_tools import mark_color

MASK_COLOR = QColor(255, 214, 0)


def mask_wkt(spec, densify=None, crop_size=1024):
    """The dense reference mask of a ReferenceSpec as (WKT in the raster's CRS, n_pixels, densified).

    Uses the engine's ``build_reference`` (same code as a run), then vectorises the mask on its grid. Pure
    Python (no QGIS object), so a QgsTask can run it in a worker thread. Raises ImportError while the engine has
    no ``core.reference``, VirefsamError for a reference the engine refuses.
    """
    import numpy as np
    from rasterio import features as rfeatures
    from shapely.geometry import shape
    from shapely.ops import unary_union

    from ..core.reference import build_reference

    ref = build_reference(spec, densify=densify, crop_size=crop_size)
    mask = np.asarray(ref.mask, dtype=bool)
    if not mask.any():
        return "", 0, False
    shapes = [
        shape(geom)
        for geom, value in rfeatures.shapes(mask.astype("uint8"), mask=mask, transform=ref.transform)
        if value
    ]
    return unary_union(shapes).wkt, int(mask.sum()), bool(getattr(ref, "densified", False))


def mask_geometry(spec, densify=None, crop_size=1024):
    """:func:`mask_wkt` as (QgsGeometry, n_pixels)."""
    wkt, n, _ = mask_wkt(spec, densify=densify, crop_size=crop_size)
    return (QgsGeometry.fromWkt(wkt) if wkt else QgsGeometry()), n


class ReferenceOverlay:
    def __init__(self, canvas) -> None:
        self.canvas = canvas
        self._bands: List[QgsRubberBand] = []
        self._mask_band: Optional[QgsRubberBand] = None

    # -- marks --------------------------------------------------------------------------------------------------
    def show_references(self, references, current_index: int) -> None:
        self._clear_marks()
        for i, ref in enumerate(references):
            strong = i == current_index
            for mark in ref.marks:
                g = mark.geometry
                gtype = QgsWkbTypes.PolygonGeometry if g.type() == QgsWkbTypes.PolygonGeometry else QgsWkbTypes.LineGeometry
                band = QgsRubberBand(self.canvas, gtype)
                band.setStrokeColor(mark_color(mark.background, 255 if strong else 140))
                band.setColor(mark_color(mark.background, 60 if strong else 30))
                band.setFillColor(mark_color(mark.background, 60 if strong else 30))
                band.setWidth(3 if strong else 2)
                band.setToGeometry(g, ref.crs if ref.crs.isValid() else None)
                self._bands.append(band)
        self.canvas.refresh()

    def _clear_marks(self) -> None:
        scene = self.canvas.scene()
        for band in self._bands:
            if scene is not None:
                scene.removeItem(band)
        self._bands = []

    @property
    def mark_bands(self) -> List[QgsRubberBand]:
        return list(self._bands)

    # -- dense mask ---------------------------------------------------------------------------------------------
    def show_mask(self, geometry: Optional[QgsGeometry], crs) -> None:
        if self._mask_band is None:
            self._mask_band = QgsRubberBand(self.canvas, QgsWkbTypes.PolygonGeometry)
            c = QColor(MASK_COLOR)
            c.setAlpha(110)
            self._mask_band.setFillColor(c)
            self._mask_band.setStrokeColor(QColor(MASK_COLOR.red(), MASK_COLOR.green(), 0, 230))
            self._mask_band.setWidth(1)
        if geometry is None or geometry.isNull() or geometry.isEmpty():
            self._mask_band.reset(QgsWkbTypes.PolygonGeometry)
        else:
            self._mask_band.setToGeometry(geometry, crs)
        self.canvas.refresh()

    def clear_mask(self) -> None:
        if self._mask_band is not None:
            self._mask_band.reset(QgsWkbTypes.PolygonGeometry)

    @property
    def mask_band(self) -> Optional[QgsRubberBand]:
        return self._mask_band

    def remove(self) -> None:
        self._clear_marks()
        if self._mask_band is not None:
            scene = self.canvas.scene()
            if scene is not None:
                scene.removeItem(self._mask_band)
            self._mask_band = None
