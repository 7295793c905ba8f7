"""What the dock sections share: the title, the icon, the model / mode / device choices, combo helpers."""

from __future__ import annotations

import os

from qgis.PyQt.QtWidgets import QComboBox

TITLE = "ViRefSAM"

MODELS = (
    ("Embedded SAM (default, no download)", "embedded"),
    ("MobileSAM checkpoint (vit_t)", "vit_t"),
    ("SAM ViT-B checkpoint (vit_b)", "vit_b"),
    ("SAM ViT-L checkpoint (vit_l)", "vit_l"),
    ("SAM ViT-H checkpoint (vit_h)", "vit_h"),
)
MODES = (
    ("ViRefSAM (VCP + DTA adapters)", "virefsam"),
    ("Training-free", "training_free"),
)
DEVICES = (("Automatic (CUDA if available)", "auto"), ("CPU", "cpu"), ("CUDA GPU", "cuda"))

ICON = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(__file__))), "resources", "icon.svg")


def _choice_combo(name: str, choices, tooltip: str = "") -> QComboBox:
    """A QComboBox named ``name`` holding (label, value) ``choices``, with an optional tooltip."""
    combo = QComboBox()
    combo.setObjectName(name)
    for label, value in choices:
        combo.addItem(label, value)
    if tooltip:
        combo.setToolTip(tooltip)
    return combo


def _set_combo_data(combo: QComboBox, value) -> None:
    i = combo.findData(value)
    if i >= 0:
        combo.setCurrentIndex(i)


def _alive(layer) -> bool:
    try:
        layer.id()
        return True
    except RuntimeError:
        return False
