"""The dock's "Run on: this computer / Dask cluster at [address]" control (``RunParams.cluster``, core/cluster.py).

``RunOnWidget.cluster()`` is ``""`` (this computer) or the scheduler's address as typed (``tcp://HOST:8786``);
an address core refuses ends in the core's one sentence (InputError) when the run's parameters are built.
The choice is kept between sessions in QgsSettings (``virefsam/run_on``, ``virefsam/cluster_address``).
"""

from __future__ import annotations

from qgis.core import QgsSettings
from qgis.PyQt.QtWidgets import QComboBox, QHBoxLayout, QLineEdit, QWidget

THIS_COMPUTER, CLUSTER = "local", "cluster"
CHOICES = (("This computer", THIS_COMPUTER), ("Dask cluster at", CLUSTER))
TOOLTIP = (
    "Where the tiles are segmented:\n"
    "• This computer: in QGIS's own process.\n"
    "• Dask cluster at: on the workers of a Dask scheduler (tcp://HOST:8786), started with 'dask scheduler' and "
    "'dask worker tcp://HOST:8786' in the plugin's Python environment; the workers read the rasters themselves, "
    "so the rasters' paths must reach them (a shared folder). The reference is prepared here; the polygons are "
    "made here, the same as a run on this computer."
)
KEY_CHOICE, KEY_ADDRESS = "virefsam/run_on", "virefsam/cluster_address"


class RunOnWidget(QWidget):
    """A combo (this computer / Dask cluster at) and the scheduler's address, enabled for the cluster only."""

    def __init__(self, parent=None) -> None:
        super().__init__(parent)
        self.setObjectName("run_on")
        row = QHBoxLayout(self)
        row.setContentsMargins(0, 0, 0, 0)
        self.combo = QComboBox()
        self.combo.setObjectName("run_on_combo")
        for label, value in CHOICES:
            self.combo.addItem(label, value)
        self.combo.setToolTip(TOOLTIP)
        self.address = QLineEdit()
        self.address.setObjectName("cluster_address")
        self.address.setPlaceholderText("tcp://HOST:8786")
        self.address.setToolTip(TOOLTIP)
        row.addWidget(self.combo)
        row.addWidget(self.address, 1)
        s = QgsSettings()
        i = self.combo.findData(s.value(KEY_CHOICE, THIS_COMPUTER, type=str))
        self.combo.setCurrentIndex(max(0, i))
        self.address.setText(s.value(KEY_ADDRESS, "", type=str))
        self.combo.currentIndexChanged.connect(self._changed)
        self.address.editingFinished.connect(self._changed)
        self._changed()

    def _changed(self, *args) -> None:
        self.address.setEnabled(self.combo.currentData() == CLUSTER)
        s = QgsSettings()
        s.setValue(KEY_CHOICE, self.combo.currentData())
        s.setValue(KEY_ADDRESS, self.address.text().strip())

    def cluster(self) -> str:
        """``RunParams.cluster``: "" for this computer, else the address (refused by core when malformed)."""
        if self.combo.currentData() != CLUSTER:
            return ""
        from ..core.errors import InputError

        address = self.address.text().strip()
        if not address:
            raise InputError("Type the Dask scheduler's address (tcp://HOST:8786), or run on this computer.")
        if "://" not in address and not address.startswith("local"):
            address = "tcp://" + address  # HOST:8786 as dask's own CLI takes it
        return address


def add_to_form(form) -> RunOnWidget:
    """Add the "Run on" row to a QFormLayout and return the widget (the dock's hook)."""
    widget = RunOnWidget()
    form.addRow("Run on", widget)
    return widget
