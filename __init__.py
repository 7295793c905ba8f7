"""ViRefSAM for QGIS: QGIS imports this package as ``virefsam`` and calls :func:`classFactory`.

Nothing happens at import time: no Qt, torch or engine import here, so QGIS's plugin manager (and the tests that
import ``core`` from the repository root) can import the package cheaply and safely.
"""


def classFactory(iface):  # noqa: N802 (QGIS's name)
    """Create the plugin for QGIS's ``iface``; missing Python packages are reported by the plugin, not raised."""
    from .plugin import ViRefSamPlugin

    return ViRefSamPlugin(iface)
