"""ViRefSAM engine: reference-guided segmentation of remote-sensing rasters with a frozen SAM.

Pure Python (torch, numpy, rasterio, shapely, GDAL/OGR for vector output); no QGIS or Qt import anywhere in
this package, so it runs headless (``python -m core ...``) as well as inside the QGIS plugin.
"""

from .errors import CancelledError, InputError, ModelError, VirefsamError  # noqa: F401

__all__ = ["VirefsamError", "InputError", "ModelError", "CancelledError"]
