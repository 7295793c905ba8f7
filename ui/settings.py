"""The dock's choices, kept between QGIS sessions in QgsSettings under ``virefsam/``."""

from __future__ import annotations

from typing import Any

from qgis.core import QgsSettings

from ..core.params import DEFAULT_TUNE_STEPS

PREFIX = "virefsam/"

# key -> (default, type)
DEFAULTS = {
    "class_name": ("building", str),
    "model": ("embedded", str),
    "checkpoint": ("", str),
    "mode": ("virefsam", str),
    "adapters": ("shipped", str),  # shipped | none | file (ui/adapters.py)
    "adapters_file": ("", str),
    "device": ("auto", str),
    "precision": ("fp32", str),  # fp32 | bf16 | fp16 (ui/run_options.py)
    "decoding": ("local", str),  # local | exact
    "kshot": ("ensemble", str),  # ensemble | joint (ui/run_options.py)
    "self_support": (True, bool),  # trained mode: targets decoded again with their own objects (RunParams.self_support)
    "exclude_found": (True, bool),  # trained mode: found unmarked objects not background (RunParams.exclude_found)
    "zoom_views": (True, bool),  # trained mode: zoomed views of each reference (RunParams.zoom_views)
    "tune_steps": (DEFAULT_TUNE_STEPS, int),  # run-time tuning of VCP on the references (RunParams.tune_steps), 0 = off
    "tune_files": ("vcp_alone", str),  # vcp_alone | all (RunParams.tune_files)
    "tile_size": (1024, int),
    "overlap": (128, int),
    "threshold": (0.5, float),
    "min_area": (16.0, float),
    "min_object_share": (0.05, float),  # polygons under this share of the smallest marked object are dropped
    "simplify": (1.0, float),
    "scale": ("auto", str),
    "output_to_file": (False, bool),
    "output_path": ("", str),
    "include_reference": (True, bool),
    "export_dir": ("", str),
}


def get(key: str) -> Any:
    default, typ = DEFAULTS[key]
    value = QgsSettings().value(PREFIX + key, default, type=typ)
    return typ(value) if value is not None else default


def set(key: str, value: Any) -> None:  # noqa: A001 (module namespace: settings.set)
    if key not in DEFAULTS:
        raise KeyError(key)
    QgsSettings().setValue(PREFIX + key, value)


def reset() -> None:
    """Forget every ViRefSAM setting (used by tests)."""
    s = QgsSettings()
    s.remove(PREFIX.rstrip("/"))
