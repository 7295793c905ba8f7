"""``make package``: the ZIP holds the plugin and nothing else, and QGIS installs it with its own installer.

The install runs in a fresh process with a fresh, empty QGIS profile (``QGIS_CUSTOM_CONFIG_PATH`` in a temp
folder): QGIS's own ``pyplugin_installer.QgsPluginInstaller().installFromZipFile`` (what Plugins > Install from
ZIP calls) unzips it into the profile, loads and starts the plugin; then the dock is opened. Only the plugin
manager's C++ widget interface, which exists only inside the QGIS desktop, is a recorder here.
"""

import json
import os
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
TESTS = Path(__file__).resolve().parent


@pytest.fixture(scope="module")
def plugin_zip(tmp_path_factory):
    out = tmp_path_factory.mktemp("dist")
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "package.py"), "--out", str(out)], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    zips = list(out.glob("virefsam-*.zip"))
    assert len(zips) == 1
    assert proc.stdout.strip().startswith(f"package: {zips[0]} (") and " MB, " in proc.stdout
    return zips[0]


def test_zip_holds_the_plugin_and_nothing_else(plugin_zip):
    import configparser

    cp = configparser.ConfigParser(interpolation=None)
    cp.read(ROOT / "metadata.txt", encoding="utf-8")
    assert plugin_zip.name == f"virefsam-{cp['general']['version']}.zip"
    with zipfile.ZipFile(plugin_zip) as zf:
        names = zf.namelist()
        assert zf.testzip() is None
    assert {n.split("/")[0] for n in names} == {"virefsam"}
    rel = {n[len("virefsam/"):] for n in names}
    for needed in ("metadata.txt", "LICENSE", "__init__.py", "plugin.py", "requirements.txt", "ui/dock/__init__.py",
                   "core/pipeline.py", "resources/icon.svg",
                   "resources/adapters/embedded_virefsam.pt", "ui/installer.py", "ui/install_panel.py",
                   "ui/pip_install.py", "ui/deps_folder.py"):
        assert needed in rel, needed
    assert not [n for n in rel if n.startswith(("tests/", "scripts/", "docs/", ".venv", "out/", "dist/", "."))]
    assert not [n for n in rel if "__pycache__" in n or n.endswith((".pyc", ".part"))]
    # the adapters' evaluation records stay in the repository; the model card travels with the weights
    assert "resources/adapters/MODEL_CARD.md" in rel
    assert not [n for n in rel if n.startswith("resources/adapters/") and n.count("/") > 2]
    weights = [n for n in rel if n.endswith((".pt", ".pth", ".onnx", ".safetensors", ".ckpt"))]
    assert weights and all(n.startswith("resources/adapters/") and n.endswith(".pt") for n in weights)


def test_metadata_problems_are_refused(tmp_path):
    sys.path.insert(0, str(ROOT / "scripts"))
    try:
        import package
    finally:
        sys.path.remove(str(ROOT / "scripts"))
    (tmp_path / "metadata.txt").write_text("[general]\nname=X\nversion=1.0\nemail=nobody\n", encoding="utf-8")
    problems = package.check_metadata(package.read_metadata(tmp_path), tmp_path)
    assert "metadata.txt lacks the mandatory 'qgisMinimumVersion'." in problems
    assert "metadata.txt's 'email' is not an e-mail address." in problems
    assert any("LICENSE" in p for p in problems)
    with pytest.raises(package.PackageError):
        package.build(tmp_path / "dist", root=tmp_path, files=[])
    assert not (tmp_path / "dist").exists() or not list((tmp_path / "dist").iterdir())


INSTALL = textwrap.dedent(
    r"""
    import json, os, sys
    sys.path.insert(0, {tests!r})
    sys.path.insert(0, "/usr/share/qgis/python")          # QGIS's own Python modules (pyplugin_installer)
    from qgis.core import QgsApplication
    app = QgsApplication([], True)                        # profile from QGIS_CUSTOM_CONFIG_PATH, as QGIS does
    app.initQgis()
    import qgis.utils
    from qgis_iface import RealWidgetIface

    class PluginManager:                                  # the C++ plugin manager of the QGIS desktop
        def __init__(self): self.messages, self.metadata = [], []
        def pushMessage(self, text, level, *a): self.messages.append(text)
        def clearPythonPluginMetadata(self): self.metadata.clear()
        def addPluginMetadata(self, md): self.metadata.append(dict(md))
        def clearRepositoryList(self): pass
        def addToRepositoryList(self, *a): pass
        def reloadModel(self): pass

    class Iface(RealWidgetIface):
        manager = PluginManager()
        def pluginManagerInterface(self): return self.manager

    iface = Iface(); iface.mainWindow().show(); qgis.utils.iface = iface
    # what QGIS's Python start-up (QgsPythonUtilsImpl) does with the profile's plugin folder
    home = os.path.join(QgsApplication.qgisSettingsDirPath(), "python", "plugins")
    qgis.utils.home_plugin_path = home
    qgis.utils.plugin_paths[:] = [home]
    sys.path.insert(0, home)
    from pyplugin_installer.installer import QgsPluginInstaller
    installer = QgsPluginInstaller()
    installer.installFromZipFile({zip!r})
    plugin = qgis.utils.plugins.get("virefsam")
    result = {{"home": home, "installed": sorted(os.listdir(home)) if os.path.isdir(home) else [],
              "active": qgis.utils.isPluginLoaded("virefsam"), "messages": iface.manager.messages,
              "meta": [m.get("id") for m in iface.manager.metadata if m.get("id") == "virefsam"],
              "module": getattr(sys.modules.get("virefsam"), "__file__", None)}}
    if plugin is not None:
        plugin.action.trigger()
        app.processEvents()
        from qgis.PyQt.QtWidgets import QDockWidget
        docks = [d for d in iface.mainWindow().findChildren(QDockWidget) if d.objectName() == "ViRefSamDock"]
        result["dock_visible"] = len(docks) == 1 and docks[0].isVisible()
        result["unloaded"] = qgis.utils.unloadPlugin("virefsam")
    print("RESULT" + json.dumps(result)); sys.stdout.flush()
    os._exit(0)
    """
)


def test_qgis_installs_the_zip_into_a_fresh_profile(plugin_zip, tmp_path):
    config = tmp_path / "qgis-config"
    env = dict(os.environ, QT_QPA_PLATFORM="offscreen", QGIS_CUSTOM_CONFIG_PATH=str(config), HOME=str(tmp_path))
    env.pop("PYTHONPATH", None)
    script = INSTALL.format(tests=str(TESTS), zip=str(plugin_zip))
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600, env=env,
                          cwd=str(tmp_path))
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT")]
    assert lines, f"no result; stdout={proc.stdout[-2000:]} stderr={proc.stderr[-3000:]}"
    out = json.loads(lines[-1][len("RESULT"):])
    home = Path(out["home"])
    assert home.is_relative_to(config)  # the fresh profile, not the user's
    assert out["installed"] == ["virefsam"]
    assert (home / "virefsam" / "metadata.txt").is_file()
    assert any("Plugin installed successfully" in m for m in out["messages"]), out["messages"]
    assert out["active"] and out["meta"] == ["virefsam"]
    assert Path(out["module"]).resolve().is_relative_to(home.resolve())  # the unzipped copy, not this checkout
    assert out["dock_visible"] and out["unloaded"]
