"""Export result layers to a GeoPackage or Shapefile(s) with QgsVectorFileWriter, in each layer's own CRS
(the CRS of the raster it was found in).

* GeoPackage: every layer becomes a table of one file (table name = layer name, made safe).
* Shapefile: one layer -> exactly the given path; several -> ``<stem>_<layer>.shp`` beside it.

Nothing is overwritten unless ``overwrite=True`` (the dock passes it after the file dialog's confirmation).
"""

from __future__ import annotations

import os
import re
from typing import List, Sequence

from qgis.core import QgsCoordinateTransformContext, QgsProject, QgsVectorFileWriter, QgsVectorLayer

from ..core.errors import InputError

DRIVERS = {".gpkg": "GPKG", ".shp": "ESRI Shapefile"}


def driver_for(path: str) -> str:
    ext = os.path.splitext(path)[1].lower()
    if ext not in DRIVERS:
        raise InputError(f"Cannot export to '{os.path.basename(path)}': choose a .gpkg or .shp file name.")
    return DRIVERS[ext]


def safe_name(name: str) -> str:
    s = re.sub(r"[^0-9A-Za-z_]+", "_", name).strip("_")
    return s or "layer"


def export_layers(layers: Sequence[QgsVectorLayer], path: str, overwrite: bool = False) -> List[str]:
    """Write ``layers`` to ``path``; returns the written files (``file.gpkg|layername=...`` for GeoPackage)."""
    layers = [lay for lay in layers if lay is not None and lay.isValid()]
    if not layers:
        raise InputError("There is no result layer to export: run ViRefSAM first.")
    driver = driver_for(path)
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise InputError(f"The folder {folder} does not exist: choose another place for the export.")
    context = QgsProject.instance().transformContext() if QgsProject.instance() else QgsCoordinateTransformContext()

    if driver == "ESRI Shapefile":
        stem = os.path.splitext(path)[0]
        targets = [path] if len(layers) == 1 else [f"{stem}_{safe_name(lay.name())}.shp" for lay in layers]
        existing = [t for t in targets if os.path.exists(t)]
        if existing and not overwrite:
            raise InputError(f"{os.path.basename(existing[0])} already exists: choose another name or delete it.")
    else:
        targets = [path] * len(layers)
        if os.path.exists(path) and not overwrite:
            raise InputError(f"{os.path.basename(path)} already exists: choose another name or delete it.")
        if os.path.exists(path) and overwrite:
            os.remove(path)

    written = []
    used_names = set()
    for layer, target in zip(layers, targets):
        options = QgsVectorFileWriter.SaveVectorOptions()
        options.driverName = driver
        options.fileEncoding = "UTF-8"
        if driver == "GPKG":
            name = safe_name(layer.name())
            base, i = name, 2
            while name in used_names:
                name, i = f"{base}_{i}", i + 1
            used_names.add(name)
            options.layerName = name
            options.actionOnExistingFile = (
                QgsVectorFileWriter.CreateOrOverwriteLayer if written else QgsVectorFileWriter.CreateOrOverwriteFile
            )
        else:
            options.actionOnExistingFile = QgsVectorFileWriter.CreateOrOverwriteFile
        error, message, new_file, new_layer = QgsVectorFileWriter.writeAsVectorFormatV3(layer, target, context, options)
        if error != QgsVectorFileWriter.NoError:
            raise InputError(f"Could not write {os.path.basename(target)}: {message or 'unknown error'}.")
        written.append(f"{new_file}|layername={new_layer}" if driver == "GPKG" else new_file)
    return written
