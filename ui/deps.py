"""Which Python packages the engine needs, and the one sentence that says where to install the missing ones
(the dock's "Install dependencies", :mod:`.installer`).

Checked without importing (``importlib.util.find_spec``) so that QGIS starts fast; a package that is present
but broken is reported when a run imports it (see :func:`describe_import_error`).
"""

from __future__ import annotations

import importlib.util
from typing import List, Tuple

# (module imported by the engine, name on PyPI)
REQUIRED: Tuple[Tuple[str, str], ...] = (
    ("numpy", "numpy<2"),
    ("torch", "torch"),
    ("torchvision", "torchvision"),
    ("segment_anything", "segment-anything"),
    ("mobile_sam", "mobilesam-mirror"),
    ("timm", "timm"),
    ("rasterio", "rasterio"),
    ("shapely", "shapely"),
)

PIP_NAME = dict(REQUIRED)


def _importable(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):  # ValueError: sys.modules[module] is None or has no __spec__
        return False


def missing_dependencies() -> List[str]:
    """The modules in :data:`REQUIRED` that cannot be imported, in order."""
    return [module for module, _ in REQUIRED if not _importable(module)]


def pip_command(modules: List[str]) -> str:
    """``python3 -m pip install ...`` for the given modules (run it in the Python that QGIS uses)."""
    names = [PIP_NAME.get(m, m) for m in modules]
    return "python3 -m pip install " + " ".join(f'"{n}"' if "<" in n or ">" in n else n for n in names)


def install_message(modules: List[str], processing: bool = False) -> str:
    """One sentence for the message bar (or a Processing error): what is missing and where to install it."""
    what = f"ViRefSAM needs the Python package(s) {', '.join(modules)}, which QGIS's Python cannot import"
    if processing:
        return (f'{what}: open the ViRefSAM dock (Raster menu > ViRefSAM) and click "Install dependencies", then '
                "run the algorithm again.")
    return (f'{what}: click "Install dependencies" in the ViRefSAM dock (Raster menu > ViRefSAM); they go into a '
            "folder of this QGIS profile and leave QGIS's own packages alone.")


def describe_import_error(exc: ImportError) -> str:
    """The install sentence for an ImportError raised while a run imported the engine."""
    name = getattr(exc, "name", None) or ""
    top = name.split(".")[0]
    if top in PIP_NAME:
        return install_message([top])
    missing = missing_dependencies()
    if missing:
        return install_message(missing)
    return f"ViRefSAM could not import a Python package it needs ({exc}); reinstall it with pip and restart QGIS."


def guard_engine_imports() -> None:
    """Keep imports that crash QGIS out of its process; call before the engine imports torch.

    torchvision imports ``torch._dynamo``, which imports ``triton`` when it is installed (Linux CUDA wheels of
    torch bring it). Triton's ``libtriton.so`` carries its own LLVM and crashes the whole process (SIGSEGV) when
    QGIS has already loaded Mesa's ``libLLVM`` for OpenGL, which the desktop does. The engine needs no triton (no
    ``torch.compile``): make ``import triton`` fail cleanly instead (torch then reports no triton). Set
    ``VIREFSAM_ALLOW_TRITON=1`` to leave it alone.
    """
    import os
    import sys

    if os.environ.get("VIREFSAM_ALLOW_TRITON") == "1":
        return
    if "triton" not in sys.modules:
        sys.modules["triton"] = None  # type: ignore[assignment]
