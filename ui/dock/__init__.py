"""The ViRefSAM dock: mark a reference, choose targets and a model, run, get polygons.

Workflow of the analyst (issue #6):
1. type the class name, choose the reference raster;
2. mark one example: scribble on it (Shift + drag = background), draw a polygon, or take the selected features
   of a vector layer; the dense mask the engine derives from the marks is shown on the canvas at once;
   "New reference" starts another example (K-shot), on the same or another raster;
3. tick the target rasters (all open rasters by default; web layers cannot be targets);
4. Run: a QgsTask runs the engine in the background, the progress bar follows, Cancel stops it within seconds;
5. one memory layer per target appears under a group named after the class; Export writes them to a
   GeoPackage or Shapefile.

One file per section of the dock, each a mixin of :class:`ViRefSamDock` that builds its box
(``_build_*``), connects its widgets (``_connect_*``), loads / saves its settings (``_load_*_settings``,
``_save_*_settings``) and holds its behaviour:

reference.py  1. class and reference: marking tools, references, mask preview
corrections.py  in 1.: "Not <class>" / "More like this" on selected result polygons (also the layer context menu)
classes.py    in 1.: the list of classes of the run (each its own references and negatives)
targets.py    2. target rasters
model.py      3. model, adapters, device, precision, decoding; the Options box
run.py        4. output, Run / Cancel, RunParams, the task's end, export
The Dependencies panel on top (``ui/install_panel.py``) shows itself when the engine's packages are missing.
common.py     the title, icon, choices and combo helpers they share
"""

from __future__ import annotations

from typing import List, Optional

from qgis.core import QgsProject, QgsVectorLayer
from qgis.gui import QgsDockWidget
from qgis.PyQt.QtCore import Qt, QTimer
from qgis.PyQt.QtWidgets import QScrollArea, QVBoxLayout, QWidget

from .. import adapters as adapter_choice
from ..overlay import ReferenceOverlay
from ..references import ReferenceSet
from ..task import SegmentTask
from .common import DEVICES, ICON, MODELS, MODES, TITLE  # noqa: F401  (names of the dock module before the split)
from .classes import ClassesSection
from .corrections import CorrectionsSection
from .model import ModelSection
from .reference import ReferenceSection
from .run import RunSection
from .targets import TargetsSection


class ViRefSamDock(ReferenceSection, ClassesSection, CorrectionsSection, TargetsSection, ModelSection, RunSection,
                   QgsDockWidget):
    def __init__(self, iface, parent=None) -> None:
        super().__init__(TITLE, parent or iface.mainWindow())
        self.setObjectName("ViRefSamDock")
        self.iface = iface
        self.canvas = iface.mapCanvas()
        self.project = QgsProject.instance()
        self.task: Optional[SegmentTask] = None
        self.last_layers: List[QgsVectorLayer] = []
        self._confirmed_output = ""
        self._loading = True
        self._syncing = False  # the mode and adapter combos are being set from each other
        self._adapters_before_none = adapter_choice.SHIPPED

        self.references = ReferenceSet(self)
        self.overlay = ReferenceOverlay(self.canvas)
        self._preview_timer = QTimer(self)
        self._preview_timer.setSingleShot(True)
        self._preview_timer.setInterval(250)
        self._preview_timer.timeout.connect(self.update_mask_preview)
        self.mask_pixels = 0
        self.mask_error = ""
        self.mask_densified = False
        self.preview_task = None
        self._preview_generation = 0
        self._preview_pending = False

        self._build_ui()
        self._make_tools()
        self._load_settings()
        self._loading = False

        self.references.changed.connect(self._references_changed)
        self.project.layersAdded.connect(self._layers_changed)
        self.project.layersRemoved.connect(self._layers_changed)
        self.project.layerWillBeRemoved.connect(self._layer_will_be_removed)
        self.refresh_targets()
        self._reference_layer_changed()
        self._references_changed()

    # ================================================================================================ UI ======
    def _build_ui(self) -> None:
        body = QWidget()
        layout = QVBoxLayout(body)
        layout.setContentsMargins(4, 4, 4, 4)
        # "Install dependencies" / Repair / Remove (ui/install_panel.py): it shows itself when the engine's
        # packages are missing, and offers to prepare the embedded model
        from ..install_panel import InstallPanel

        self.install_panel = InstallPanel(self.iface)
        layout.addWidget(self.install_panel)
        layout.addWidget(self._build_reference_box())
        layout.addWidget(self._build_targets_box())
        for box in self._build_model_boxes():
            layout.addWidget(box)
        layout.addWidget(self._build_output_box())
        layout.addStretch(1)

        scroll = QScrollArea()
        scroll.setWidgetResizable(True)
        scroll.setHorizontalScrollBarPolicy(Qt.ScrollBarAlwaysOff)
        self.setMinimumWidth(330)
        scroll.setWidget(body)

        outer = QWidget()
        ov = QVBoxLayout(outer)
        ov.setContentsMargins(0, 0, 0, 0)
        ov.addWidget(scroll, 1)
        self._build_run_row(ov)
        self.setWidget(outer)

        self._connect_reference()
        self._connect_corrections()
        self._connect_classes()
        self._connect_targets()
        self._connect_model()
        self._connect_run()

    # ========================================================================================== settings ======
    def _load_settings(self) -> None:
        self._load_reference_settings()
        self._load_targets_settings()
        self._load_model_settings()
        self._load_run_settings()

    def save_settings(self, *args) -> None:
        if self._loading:
            return
        self._save_reference_settings()
        self._save_targets_settings()
        self._save_model_settings()
        self._save_run_settings()

    # ========================================================================================== shutdown ======
    def shutdown(self) -> None:
        """Plugin unload: stop listening, cancel a run, take every tool and canvas item away."""
        self._preview_timer.stop()
        self.install_panel.shutdown()
        self._shutdown_corrections()
        for signal, slot in (
            (self.project.layersAdded, self._layers_changed),
            (self.project.layersRemoved, self._layers_changed),
            (self.project.layerWillBeRemoved, self._layer_will_be_removed),
        ):
            try:
                signal.disconnect(slot)
            except (TypeError, RuntimeError):
                pass
        for task in (self.task, self.preview_task):
            if task is not None:
                task.on_finished = None  # the dock is going away: the task must not call back into it
                task.cancel()
        self.task = self.preview_task = None
        for tool in self.tools.values():
            if self.canvas.mapTool() is tool:
                self.canvas.unsetMapTool(tool)
            tool.remove_band()
        self.overlay.remove()
