"""Map tools with which an analyst marks a reference on the canvas.

* :class:`ScribbleTool`: press, drag and release draws a freehand line. Foreground by default; with Shift held at
  the press (or on a tool made with ``background=True``) the line marks background ("not this class").
* :class:`PolygonTool`: left clicks add vertices, a right click, a double click or Enter closes the polygon;
  Backspace removes the last vertex, Escape abandons it. Shift at the first click (or ``background=True``)
  marks background.

Both emit ``geometryDrawn(QgsGeometry, bool)`` with the geometry already transformed from the canvas CRS to the
CRS set by :meth:`ReferenceMapTool.set_target_crs` (the reference raster's CRS), and ``is_background``.
The rubber band that shows the line being drawn belongs to the tool and is removed by :meth:`clean` /
:meth:`deactivate`.
"""

from __future__ import annotations

from typing import List, Optional

from qgis.core import (
    QgsCoordinateReferenceSystem,
    QgsCoordinateTransform,
    QgsGeometry,
    QgsPointXY,
    QgsProject,
    QgsWkbTypes,
)
from qgis.gui import QgsMapMouseEvent, QgsMapTool, QgsRubberBand
from qgis.PyQt.QtCore import Qt, pyqtSignal
from qgis.PyQt.QtGui import QColor

FOREGROUND_COLOR = QColor(0, 200, 83)
BACKGROUND_COLOR = QColor(229, 57, 53)


def mark_color(background: bool, alpha: int = 255) -> QColor:
    c = QColor(BACKGROUND_COLOR if background else FOREGROUND_COLOR)
    c.setAlpha(alpha)
    return c


class ReferenceMapTool(QgsMapTool):
    """Common part: target CRS, the drawing rubber band, the transform canvas CRS -> target CRS."""

    geometryDrawn = pyqtSignal(QgsGeometry, bool)
    # a short sentence for the dock's status line ("Polygon needs at least 3 vertices", ...)
    message = pyqtSignal(str)

    geometry_type = QgsWkbTypes.LineGeometry

    def __init__(self, canvas, background: bool = False) -> None:
        super().__init__(canvas)
        self.background = background
        self.target_crs: Optional[QgsCoordinateReferenceSystem] = None
        self._points: List[QgsPointXY] = []
        self._drawing_background = background
        self._band: Optional[QgsRubberBand] = None
        self.setCursor(Qt.CrossCursor)

    # -- CRS ----------------------------------------------------------------------------------------------------
    def set_target_crs(self, crs: Optional[QgsCoordinateReferenceSystem]) -> None:
        """Geometries are emitted in this CRS (None or invalid: the canvas CRS)."""
        self.target_crs = crs if crs is not None and crs.isValid() else None

    def output_crs(self) -> QgsCoordinateReferenceSystem:
        return self.target_crs or self.canvas().mapSettings().destinationCrs()

    def to_target(self, geometry: QgsGeometry) -> QgsGeometry:
        g = QgsGeometry(geometry)
        src = self.canvas().mapSettings().destinationCrs()
        dst = self.output_crs()
        if src.isValid() and dst.isValid() and src != dst:
            g.transform(QgsCoordinateTransform(src, dst, QgsProject.instance()))
        return g

    # -- rubber band --------------------------------------------------------------------------------------------
    def _ensure_band(self) -> QgsRubberBand:
        if self._band is None:
            self._band = QgsRubberBand(self.canvas(), self.geometry_type)
            self._band.setWidth(3)
        color = mark_color(self._drawing_background)
        self._band.setStrokeColor(color)
        self._band.setColor(mark_color(self._drawing_background, 70))
        return self._band

    def _reset(self) -> None:
        self._points = []
        if self._band is not None:
            self._band.reset(self.geometry_type)

    def clean(self) -> None:  # QgsMapTool API: drop whatever is half drawn
        self._reset()

    def deactivate(self) -> None:
        self._reset()
        super().deactivate()

    def remove_band(self) -> None:
        """Take the tool's rubber band off the canvas (plugin unload)."""
        self._reset()
        if self._band is not None:
            scene = self.canvas().scene()
            if scene is not None:
                scene.removeItem(self._band)
            self._band = None

    @property
    def points(self) -> List[QgsPointXY]:
        """The vertices drawn so far, in canvas map coordinates."""
        return list(self._points)

    def _emit(self, geometry: QgsGeometry) -> None:
        self.geometryDrawn.emit(self.to_target(geometry), bool(self._drawing_background))

    def _is_background(self, e: QgsMapMouseEvent) -> bool:
        return self.background or bool(e.modifiers() & Qt.ShiftModifier)


class ScribbleTool(ReferenceMapTool):
    """Freehand line: press, drag, release."""

    MIN_PIXELS = 2  # a new vertex only after the pointer moved this far (screen pixels)

    def __init__(self, canvas, background: bool = False) -> None:
        super().__init__(canvas, background)
        self.setToolName("ViRefSAM scribble" + (" (background)" if background else ""))
        self._last_pixel = None

    def canvasPressEvent(self, e: QgsMapMouseEvent) -> None:
        if e.button() != Qt.LeftButton:
            return
        self._reset()
        self._drawing_background = self._is_background(e)
        band = self._ensure_band()
        self._points = [e.mapPoint()]
        self._last_pixel = e.pixelPoint()
        band.addPoint(e.mapPoint(), True)

    def canvasMoveEvent(self, e: QgsMapMouseEvent) -> None:
        if not self._points or not (e.buttons() & Qt.LeftButton):
            return
        p = e.pixelPoint()
        if self._last_pixel is not None and (p - self._last_pixel).manhattanLength() < self.MIN_PIXELS:
            return
        self._last_pixel = p
        self._points.append(e.mapPoint())
        self._ensure_band().addPoint(e.mapPoint(), True)

    def canvasReleaseEvent(self, e: QgsMapMouseEvent) -> None:
        if e.button() != Qt.LeftButton or not self._points:
            return
        if e.mapPoint() != self._points[-1]:
            self._points.append(e.mapPoint())
        points = self._points
        self._reset()
        distinct = {(p.x(), p.y()) for p in points}
        if len(distinct) < 2:
            self.message.emit("A scribble is a line: press and drag across the object.")
            return
        self._emit(QgsGeometry.fromPolylineXY(points))

    def keyPressEvent(self, e) -> None:
        if e.key() == Qt.Key_Escape:
            self._reset()
            e.accept()
        else:
            e.ignore()


class PolygonTool(ReferenceMapTool):
    """Polygon by clicks: left adds a vertex, right / double click / Enter closes, Backspace undoes a vertex."""

    geometry_type = QgsWkbTypes.PolygonGeometry

    def __init__(self, canvas, background: bool = False) -> None:
        super().__init__(canvas, background)
        self.setToolName("ViRefSAM polygon" + (" (background)" if background else ""))

    def _redraw(self, hover: Optional[QgsPointXY] = None) -> None:
        band = self._ensure_band()
        band.reset(self.geometry_type)
        points = self._points + ([hover] if hover is not None else [])
        for i, p in enumerate(points):
            band.addPoint(p, i == len(points) - 1)

    def canvasReleaseEvent(self, e: QgsMapMouseEvent) -> None:
        if e.button() == Qt.LeftButton:
            if not self._points:
                self._drawing_background = self._is_background(e)
            self._points.append(e.mapPoint())
            self._redraw()
        elif e.button() == Qt.RightButton:
            self.finish()

    def canvasDoubleClickEvent(self, e: QgsMapMouseEvent) -> None:
        # the double click's first release already added its vertex
        self.finish()

    def canvasMoveEvent(self, e: QgsMapMouseEvent) -> None:
        if self._points:
            self._redraw(e.mapPoint())

    def keyPressEvent(self, e) -> None:
        key = e.key()
        if key in (Qt.Key_Backspace, Qt.Key_Delete) and self._points:
            self._points.pop()
            self._redraw()
            e.accept()
        elif key == Qt.Key_Escape:
            self._reset()
            e.accept()
        elif key in (Qt.Key_Return, Qt.Key_Enter):
            self.finish()
            e.accept()
        else:
            e.ignore()

    def finish(self) -> None:
        """Close the polygon drawn so far and emit it (at least 3 distinct vertices and a non-zero area)."""
        points = []
        for p in self._points:
            if not points or p != points[-1]:
                points.append(p)
        self._reset()
        if len(points) < 3:
            if points:
                self.message.emit("A polygon needs at least 3 vertices; right-click closes it.")
            return
        geometry = QgsGeometry.fromPolygonXY([points + [points[0]]])
        if geometry.area() <= 0:
            self.message.emit("The polygon has no area; draw it again.")
            return
        if not geometry.isGeosValid():
            geometry = geometry.makeValid()
        self._emit(geometry)
