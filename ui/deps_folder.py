"""The plugin's own folder of Python packages inside the QGIS profile, and putting it on ``sys.path``.

``<profile>/python/virefsam-deps/py3.11/`` (one folder per Python version: a QGIS upgrade to another Python
gets a fresh folder, never wheels built for the wrong interpreter). ``ui.installer`` fills it with
``pip install --target``; the marker file ``.virefsam-complete.json`` is written last, only when pip finished,
QGIS's own packages were taken out again and a fresh Python imported the engine's packages from it. A folder
without the marker is half-finished (pip cancelled, crashed, disk full): it is never put on ``sys.path``.

Standard library only (no Qt, no QGIS): ``plugin.py`` calls :func:`activate` at every plugin start, before any
engine import, and tests run it in a bare Python.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Optional

MARKER = ".virefsam-complete.json"
ROOT_NAME = "virefsam-deps"

ABSENT, COMPLETE, INCOMPLETE = "absent", "complete", "incomplete"


def python_tag() -> str:
    return f"py{sys.version_info[0]}.{sys.version_info[1]}"


def deps_root(settings_dir: str) -> Path:
    """``<QGIS profile>/python/virefsam-deps`` (``settings_dir``: ``QgsApplication.qgisSettingsDirPath()``)."""
    return Path(settings_dir) / "python" / ROOT_NAME


def deps_dir(settings_dir: str) -> Path:
    """The folder for this Python version."""
    return deps_root(settings_dir) / python_tag()


def state(folder: Path) -> str:
    """``absent``, ``complete`` (marker present and readable) or ``incomplete`` (anything else in the folder)."""
    folder = Path(folder)
    if not folder.exists():
        return ABSENT
    info = read_marker(folder)
    return COMPLETE if info is not None else INCOMPLETE


def read_marker(folder: Path) -> Optional[dict]:
    try:
        info = json.loads((Path(folder) / MARKER).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return info if isinstance(info, dict) and info.get("python") == python_tag() else None


def write_marker(folder: Path, info: dict) -> None:
    """Write the marker through a temporary name (it exists completely or not at all)."""
    info = dict(info, python=python_tag())
    tmp = Path(folder) / (MARKER + ".part")
    tmp.write_text(json.dumps(info, indent=1, sort_keys=True), encoding="utf-8")
    os.replace(tmp, Path(folder) / MARKER)


def remove_marker(folder: Path) -> None:
    try:
        (Path(folder) / MARKER).unlink()
    except FileNotFoundError:
        pass


def activate(folder: Path) -> str:
    """Put a complete folder first on ``sys.path`` (once); never an incomplete one. Returns the folder's state.

    First, so that the engine's packages in it win over older copies elsewhere; QGIS's own packages (numpy,
    GDAL, PyQt, shapely, rasterio ...) were taken out of it by the installer, so they still come from QGIS.
    """
    folder = Path(folder)
    st = state(folder)
    path = str(folder)
    if st == COMPLETE:
        if path not in sys.path:
            sys.path.insert(0, path)
            import importlib

            importlib.invalidate_caches()
    elif path in sys.path:  # removed or broken since: take it away again
        sys.path.remove(path)
    return st
