"""The plugin loads and unloads the way QGIS does it (qgis.utils), twice in a row, leaving QGIS as it was."""

import subprocess
import sys
import textwrap

import pytest

PLUGIN = "virefsam"


def qgis_state(iface):
    """Everything the plugin may add to QGIS, as comparable plain values."""
    from qgis.core import QgsApplication
    from qgis.PyQt.QtWidgets import QDockWidget

    canvas = iface.mapCanvas()
    return {
        "toolbar": [a.text() for a in iface.pluginToolBar().actions()],
        "raster_menu": iface.raster_menu_entries(),
        "docks": sorted(d.objectName() for d in iface.mainWindow().findChildren(QDockWidget)),
        "providers": sorted(p.id() for p in QgsApplication.processingRegistry().providers()),
        "canvas_items": len(canvas.scene().items()),
        "map_tool": canvas.mapTool(),
        "messages": len(iface.messageBar().items()),
    }


def plugin_modules():
    return {m for m in sys.modules if m == PLUGIN or m.startswith(PLUGIN + ".")}


def flush_deletes(app):
    from qgis_iface import flush_deletes as flush

    flush()


@pytest.fixture(autouse=True)
def plugin_not_loaded(qgis_iface):
    """Each test starts (and ends) with the plugin not loaded, even after a failure elsewhere."""
    import qgis.utils

    if qgis.utils.isPluginLoaded(PLUGIN):
        qgis.utils.unloadPlugin(PLUGIN)
    yield
    if qgis.utils.isPluginLoaded(PLUGIN):
        qgis.utils.unloadPlugin(PLUGIN)


def load_use_unload(iface, app, plugin_parent):
    import qgis.utils
    from qgis.core import QgsApplication
    from qgis.PyQt.QtWidgets import QDockWidget

    qgis.utils.plugin_paths = [str(plugin_parent)]
    qgis.utils.updateAvailablePlugins()
    assert PLUGIN in qgis.utils.available_plugins
    assert qgis.utils.pluginMetadata(PLUGIN, "name") == "ViRefSAM"

    assert qgis.utils.loadPlugin(PLUGIN)
    assert qgis.utils.startPlugin(PLUGIN), "startPlugin failed (see the message bar / log)"
    assert qgis.utils.isPluginLoaded(PLUGIN)
    plugin = qgis.utils.plugins[PLUGIN]

    # toolbar button, Raster menu entry, Processing provider + algorithm
    assert "ViRefSAM" in [a.text() for a in iface.pluginToolBar().actions()]
    assert iface.raster_menu_entries().get("&ViRefSAM") == ["ViRefSAM"]
    registry = QgsApplication.processingRegistry()
    assert registry.providerById("virefsam") is not None
    assert registry.algorithmById("virefsam:segment_from_reference") is not None

    # the button toggles the dock
    plugin.action.trigger()
    app.processEvents()
    docks = [d for d in iface.mainWindow().findChildren(QDockWidget) if d.objectName() == "ViRefSamDock"]
    assert len(docks) == 1 and docks[0].isVisible()
    dock = docks[0]
    # use it: a map tool active and a reference drawn, so unload has tools and rubber bands to take away
    dock.activate_tool("scribble")
    assert iface.mapCanvas().mapTool() is dock.scribble_tool
    plugin.action.trigger()
    app.processEvents()
    assert not dock.isVisible() and not plugin.action.isChecked()
    plugin.action.trigger()
    app.processEvents()
    assert dock.isVisible()

    assert qgis.utils.unloadPlugin(PLUGIN)
    flush_deletes(app)
    assert not qgis.utils.isPluginLoaded(PLUGIN)
    assert registry.providerById("virefsam") is None


def test_load_unload_twice_leaves_qgis_as_it_was(qgis_app, qgis_iface, qgis_project, plugin_parent, shared_data):
    from qgis.core import QgsRasterLayer

    layer = QgsRasterLayer(str(shared_data / "oam_mosaics" / "kampala.tif"), "kampala")
    assert layer.isValid()
    qgis_project.addMapLayer(layer)
    before = qgis_state(qgis_iface)
    modules = plugin_modules()  # other tests may have imported virefsam.* already
    for _ in range(2):
        load_use_unload(qgis_iface, qgis_app, plugin_parent)
        assert qgis_state(qgis_iface) == before
        assert plugin_modules() <= modules  # QGIS removed the modules the plugin imported


def test_load_with_scribble_drawn_then_unload(qgis_app, qgis_iface, qgis_project, plugin_parent, shared_data):
    """Rubber bands of drawn references go away with the plugin."""
    import qgis.utils
    from qgis.core import QgsGeometry, QgsRasterLayer

    layer = QgsRasterLayer(str(shared_data / "oam_mosaics" / "kampala.tif"), "kampala")
    qgis_project.addMapLayer(layer)
    before = qgis_state(qgis_iface)
    qgis.utils.plugin_paths = [str(plugin_parent)]
    qgis.utils.updateAvailablePlugins()
    assert qgis.utils.loadPlugin(PLUGIN) and qgis.utils.startPlugin(PLUGIN)
    plugin = qgis.utils.plugins[PLUGIN]
    plugin.action.trigger()
    dock = plugin.dock
    dock.reference_combo.setLayer(layer)
    c = layer.extent().center()
    line = QgsGeometry.fromPolylineXY([c, c.__class__(c.x() + 5, c.y() + 5)])
    dock.references.add_marks(layer, [line])
    assert len(dock.overlay.mark_bands) == 1
    assert len(qgis_iface.mapCanvas().scene().items()) > before["canvas_items"]
    assert qgis.utils.unloadPlugin(PLUGIN)
    flush_deletes(qgis_app)
    assert qgis_state(qgis_iface) == before


MISSING_TORCH = textwrap.dedent(
    r"""
    import json, os, sys
    sys.modules["torch"] = None          # torch cannot be imported in this process
    sys.path.insert(0, {tests!r})
    sys.path.insert(0, {parent!r})
    from qgis.PyQt.QtCore import QCoreApplication, QSettings
    for fmt in (QSettings.NativeFormat, QSettings.IniFormat):
        QSettings.setPath(fmt, QSettings.UserScope, {settings!r})
    from qgis.core import QgsApplication
    app = QgsApplication([], True, {profile!r}); app.initQgis()
    import qgis.utils
    from qgis_iface import RealWidgetIface
    iface = RealWidgetIface(); qgis.utils.iface = iface
    qgis.utils.plugin_paths = [{parent!r}]
    qgis.utils.updateAvailablePlugins()
    ok = qgis.utils.loadPlugin("virefsam") and qgis.utils.startPlugin("virefsam")
    plugin = qgis.utils.plugins.get("virefsam")
    texts = [item.text() for item in iface.messageBar().items()]
    # the dock still opens, and Run repeats the install sentence instead of failing
    plugin.action.trigger()
    panel = plugin.dock.install_panel
    panel_shown = panel.isVisibleTo(plugin.dock) and panel.install_button.isVisibleTo(plugin.dock)
    iface.messageBar().clearWidgets()
    plugin.dock.run()
    run_texts = [item.text() for item in iface.messageBar().items()]
    unloaded = qgis.utils.unloadPlugin("virefsam")
    left = sorted(m for m in sys.modules if m.split(".")[0] == "virefsam")
    print("RESULT" + json.dumps({{"ok": bool(ok), "texts": texts, "run_texts": run_texts, "unloaded": unloaded, "panel": panel_shown,
                                  "left": left}}))
    sys.stdout.flush()
    os._exit(0)
    """
)


def test_missing_torch_plugin_still_loads_and_says_how_to_install(plugin_parent, tmp_path):
    import json
    import os
    from pathlib import Path

    script = MISSING_TORCH.format(
        tests=str(Path(__file__).parent),
        parent=str(plugin_parent),
        settings=str(tmp_path / "settings"),
        profile=str(tmp_path / "profile"),
    )
    env = dict(os.environ, QT_QPA_PLATFORM="offscreen")
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, env=env)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT")]
    assert lines, f"no result; stdout={proc.stdout[-2000:]} stderr={proc.stderr[-3000:]}"
    out = json.loads(lines[-1][len("RESULT"):])
    assert out["ok"] and out["unloaded"]
    assert out["left"] == []  # a fresh QGIS: unloading removed every module of the plugin
    assert len(out["texts"]) == 1
    text = out["texts"][0]
    assert "torch" in text and '"Install dependencies"' in text and "Couldn't load" not in text
    assert any('"Install dependencies"' in t and "torch" in t for t in out["run_texts"])
    assert out["panel"]  # the dock shows its Install dependencies panel


def test_metadata_is_complete_for_the_plugin_repository():
    import configparser
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    cp = configparser.ConfigParser()
    cp.read(root / "metadata.txt", encoding="utf-8")
    g = cp["general"]
    for key in ("name", "qgisMinimumVersion", "description", "about", "version", "author", "email", "repository",
                "tracker", "homepage", "tags", "category", "icon", "experimental"):
        assert g.get(key), key
    assert g["name"] == "ViRefSAM" and g["qgisMinimumVersion"] == "3.22" and g["version"] == "0.1.0"
    assert g["category"] == "Raster" and g["experimental"] == "True"
    assert '"Install dependencies"' in g["about"] and "2507.02294" in g["about"]
    assert (root / g["icon"]).is_file()
    from qgis.PyQt.QtGui import QIcon  # noqa: F401  (the icon is a valid SVG for Qt)
    import xml.dom.minidom

    xml.dom.minidom.parse(str(root / g["icon"]))
