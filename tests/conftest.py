"""Shared fixtures. Tests use real QGIS, real rasters from ../shared/data and the real embedded SAM."""

import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")

SHARED_DATA = (ROOT.parent / "shared" / "data").resolve()


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """``../shared/data`` beside the checkout (also there in CI)."""
    assert SHARED_DATA.is_dir(), f"expected the shared data at {SHARED_DATA}"
    return SHARED_DATA


@pytest.fixture(scope="session")
def embedded_sam():
    """The embedded MobileSAM-class model with its converted real weights (built once per session)."""
    from core.modeling.registry import build_sam

    return build_sam("embedded")


@pytest.fixture(scope="session")
def engine(embedded_sam):
    from core.modeling.engine import SamEngine

    return SamEngine(embedded_sam, device="cpu", precision="fp32")
