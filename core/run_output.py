"""The run's output file, checked before any work: GDAL's bindings, an existing file, the folder; and its
layers per class (``RunParams.layer_per_class``), also used when it is written (``core.pipeline.run``)."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import List, Optional

from .errors import InputError
from .params import RunParams


def vector_writing_available() -> bool:
    """Whether GDAL's Python bindings (osgeo), which write GeoPackage and Shapefile, can be imported. A run
    without an output file needs neither them nor :mod:`.writers` (the dock's memory layers, a bare CUDA
    machine's pip environment)."""
    try:
        from osgeo import ogr  # noqa: F401
    except ImportError:
        return False
    return True


def _check_output(params: RunParams) -> None:
    """Refuse an existing output file or an unwritable folder before any work is done."""
    if not params.output:
        return
    if not vector_writing_available():
        raise InputError(f"Writing {params.output} needs GDAL's Python bindings (osgeo), which are not installed: "
                         "install them (Debian: python3-gdal) or run without an output file.")
    from .writers import layer_names, output_paths

    names = layer_names(params.targets, _layer_classes(params))
    for path in output_paths(params.output, names, params.output_format):
        if os.path.exists(path) and not params.overwrite:
            raise InputError(f"The output file {path} exists already: choose another name or allow overwriting.")
    folder = Path(params.output).resolve().parent
    if not folder.is_dir():
        raise InputError(f"The output folder {folder} does not exist: choose an existing folder.")
    try:  # os.access says yes to root on read-only places (/proc, read-only mounts): try to write instead
        fd, probe = tempfile.mkstemp(prefix=".virefsam_probe_", dir=str(folder))
        os.close(fd)
        os.remove(probe)
    except OSError:
        raise InputError(f"The output folder {folder} is not writable: choose another folder.") from None


def _layer_classes(params: RunParams) -> Optional[List[str]]:
    """The class names when the output has one layer per class (``layer_per_class``), else None."""
    return [c.name for c in params.class_specs()] if params.layer_per_class else None
