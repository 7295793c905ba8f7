#!/usr/bin/env bash
# The real QGIS desktop with this checkout loaded as the plugin `virefsam` (called by `make qgis` and
# `make screenshot`).
#
#   bash scripts/qgis.sh                       start QGIS (needs a screen: DISPLAY or WAYLAND_DISPLAY)
#   bash scripts/qgis.sh --screenshot OUT.png  start QGIS under Xvfb, open the sample orthophoto, open the
#                                              ViRefSAM dock with a reference marked, save a PNG, quit
#   ... --screenshot OUT.png --run             the same, but click Run first and grab once the result
#                                              layer is on the map (a real run in the real desktop)
#   bash scripts/qgis.sh [QGIS args...]        extra arguments go to QGIS (files to open, --project, ...)
#
# How: build/qgis/plugins/virefsam is a symlink to the repository root (QGIS imports plugins by folder name),
# QGIS_PLUGINPATH points at build/qgis/plugins, the venv's site-packages (torch, segment_anything, ...) go on
# PYTHONPATH, and a dedicated QGIS profile (build/qgis/profiles, profile "virefsam") has the plugin enabled;
# your own QGIS profile is not touched. Delete build/qgis to start from a fresh profile.
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
cd "$ROOT"

SHOT=""
ARGS=()
while [ $# -gt 0 ]; do
  case "$1" in
    --screenshot)
      [ $# -ge 2 ] || { echo "usage: $0 --screenshot OUT.png [--run]" >&2; exit 2; }
      SHOT="$2"; shift 2 ;;
    --run)
      export VIREFSAM_SCREENSHOT_RUN=1; shift ;;
    -h|--help)
      sed -n '2,17p' "$0"; exit 0 ;;
    *) ARGS+=("$1"); shift ;;
  esac
done

command -v qgis >/dev/null 2>&1 || { echo "QGIS is not installed: run make setup (Debian package qgis)." >&2; exit 1; }

BUILD="$ROOT/build/qgis"
PLUGINS="$BUILD/plugins"
PROFILES="$BUILD/profiles"
PROFILE=virefsam
PROFILE_DIR="$PROFILES/profiles/$PROFILE"
mkdir -p "$PLUGINS" "$PROFILE_DIR/QGIS" "$PROFILE_DIR/python/plugins"
ln -sfn "$ROOT" "$PLUGINS/virefsam"

# Enable the plugin (and keep first-start dialogs quiet) in the profile's settings, keeping what is there.
"$(command -v python3 || echo /usr/bin/python3)" - "$PROFILE_DIR/QGIS/QGIS3.ini" <<'EOF'
import configparser, sys
path = sys.argv[1]
cp = configparser.RawConfigParser(strict=False)
cp.optionxform = str  # Qt keys are case-sensitive
cp.read(path)
def put(section, key, value):
    if not cp.has_section(section):
        cp.add_section(section)
    cp.set(section, key, value)
put("PythonPlugins", "virefsam", "true")
put("PythonPlugins", "processing", "true")
put("qgis", "checkVersion", "false")
with open(path, "w") as f:
    cp.write(f, space_around_delimiters=False)
EOF

VENV_SITE="$(ls -d "$ROOT"/.venv/lib/python3*/site-packages 2>/dev/null | head -1 || true)"
if [ -z "$VENV_SITE" ]; then
  echo "warning: no .venv found (run make setup): the plugin will load and say which packages are missing." >&2
fi
export QGIS_PLUGINPATH="$PLUGINS${QGIS_PLUGINPATH:+:$QGIS_PLUGINPATH}"
export PYTHONPATH="${VENV_SITE}${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONDONTWRITEBYTECODE=1
QGIS_ARGS=(--nologo --noversioncheck --profiles-path "$PROFILES" --profile "$PROFILE")

if [ -z "$SHOT" ]; then
  if [ -z "${DISPLAY:-}" ] && [ -z "${WAYLAND_DISPLAY:-}" ]; then
    echo "No screen (DISPLAY is not set): use 'make screenshot' to run QGIS under Xvfb and save a PNG." >&2
    exit 1
  fi
  unset QT_QPA_PLATFORM  # the Makefile exports offscreen for the tests; the desktop needs the real screen
  exec qgis "${QGIS_ARGS[@]}" "${ARGS[@]}"
fi

# -- screenshot under Xvfb ------------------------------------------------------------------------------------
# The startup script QGIS runs (--code): open the raster, open the dock, scribble across one building of the
# sample as the reference (placed with the OSM footprint mask beside the raster, when there is one), wait for
# SAM to densify it into the reference mask (yellow), grab the main window to the PNG, quit.
write_screenshot_code() {
cat >"$1" <<'PYEOF'
import os
import traceback

from qgis.core import QgsGeometry, QgsProject
from qgis.PyQt.QtCore import Qt, QTimer
from qgis.utils import iface, plugins

OUT = os.environ["VIREFSAM_SCREENSHOT"]
RASTER = os.environ["VIREFSAM_SCREENSHOT_RASTER"]
STATUS = os.environ["VIREFSAM_SCREENSHOT_STATUS"]
state = {}


def status(text):
    with open(STATUS, "w") as f:
        f.write(text + "\n")


def quit_qgis():
    QgsProject.instance().setDirty(False)
    os._exit(0)  # no "save the project?" question, no slow teardown


def one_building(raster):
    """A scribble (WKT line, raster CRS) across a mid-sized building from <stem>_buildings.tif, or None."""
    mask_path = raster[:-4] + "_buildings.tif"
    if not os.path.exists(mask_path):
        return None
    import numpy as np
    import rasterio
    from rasterio import features
    from shapely.geometry import shape

    with rasterio.open(mask_path) as src:
        mask = src.read(1) > 0
        polys = [shape(g) for g, v in features.shapes(mask.astype("uint8"), mask=mask, transform=src.transform) if v]
        centre = np.array([(src.bounds.left + src.bounds.right) / 2, (src.bounds.bottom + src.bounds.top) / 2])
    polys = [p for p in polys if p.area > 40]  # square metres (EPSG:3857 at the equator)
    if not polys:
        return None
    polys.sort(key=lambda p: np.hypot(*(np.array(p.centroid.coords[0]) - centre)))
    from shapely.geometry import LineString

    b = polys[0]
    c = b.representative_point()
    w = (b.bounds[2] - b.bounds[0]) / 3
    line = LineString([(c.x - w, c.y - w / 4), (c.x, c.y + w / 4), (c.x + w, c.y)]).intersection(b.buffer(-0.5))
    return line.wkt if line.length > 0 else b.simplify(0.3).wkt


def step_open():
    try:
        win = iface.mainWindow()
        win.resize(1600, 1000)
        win.showMaximized()
        layer = iface.addRasterLayer(RASTER, os.path.splitext(os.path.basename(RASTER))[0])
        if layer is None or not layer.isValid():
            status(f"error: QGIS could not open {RASTER}")
            return quit_qgis()
        plugin = plugins.get("virefsam")
        if plugin is None:
            status("error: the plugin virefsam is not loaded (see the log)")
            return quit_qgis()
        plugin.action.setChecked(True)
        dock = plugin.dock
        win.resizeDocks([dock], [470], Qt.Horizontal)
        state.update(layer=layer, dock=dock)
        dock.class_edit.setText("building")
        dock.reference_combo.setLayer(layer)
        wkt = one_building(RASTER)
        if wkt:
            dock.references.add_marks(layer, [QgsGeometry.fromWkt(wkt)])
        iface.mapCanvas().setExtent(layer.extent())
        iface.mapCanvas().refresh()
        QTimer.singleShot(3000, step_preview)
    except Exception:
        status("error: " + traceback.format_exc())
        quit_qgis()


def step_preview():
    """Wait (up to 90 s) for the SAM densification of the scribble, running as a QgsTask, then grab."""
    try:
        dock = state["dock"]
        state["waited"] = state.get("waited", 0) + 1
        if (dock.preview_task is not None or dock.mask_pixels == 0) and state["waited"] < 90:
            return QTimer.singleShot(1000, step_preview)
        iface.mapCanvas().refresh()
        if os.environ.get("VIREFSAM_SCREENSHOT_RUN") == "1":
            # the default run: ViRefSAM with the shipped adapters
            dock.mode_combo.setCurrentIndex(dock.mode_combo.findData("virefsam"))
            dock.adapters_combo.setCurrentIndex(dock.adapters_combo.findData("shipped"))
            dock.device_combo.setCurrentIndex(dock.device_combo.findData("cpu"))
            if dock.run() is None:
                status("error: Run refused: " + " / ".join(i.text() for i in iface.messageBar().items()))
                return quit_qgis()
            state["waited"] = 0
            return QTimer.singleShot(1000, step_wait_run)
        QTimer.singleShot(3000, step_grab)
    except Exception:
        status("error: " + traceback.format_exc())
        quit_qgis()


def step_wait_run():
    dock = state["dock"]
    state["waited"] += 1
    if dock.is_running() and state["waited"] < 240:
        return QTimer.singleShot(1000, step_wait_run)
    iface.mapCanvas().refresh()
    QTimer.singleShot(4000, step_grab)


def step_grab():
    try:
        win = iface.mainWindow()
        dock = state["dock"]
        pixmap = win.grab()
        if not pixmap.save(OUT, "PNG"):
            status(f"error: could not write {OUT}")
        else:
            marks = dock.references.total_marks()
            text = (f"ok {pixmap.width()}x{pixmap.height()}, dock visible={dock.isVisible()}, "
                    f"reference marks={marks}, mask pixels={dock.mask_pixels}, SAM-densified={dock.mask_densified}")
            if os.environ.get("VIREFSAM_SCREENSHOT_RUN") == "1":
                text += f"; run: {dock.status_label.text()}"
                if not dock.last_layers:
                    text = "error: the run added no layer: " + dock.status_label.text()
            status(text)
    except Exception:
        status("error: " + traceback.format_exc())
    quit_qgis()


QTimer.singleShot(2000, step_open)
PYEOF
}

command -v xvfb-run >/dev/null 2>&1 || { echo "xvfb-run is missing: apt-get install xvfb" >&2; exit 1; }
case "$SHOT" in /*) ;; *) SHOT="$ROOT/$SHOT" ;; esac
mkdir -p "$(dirname "$SHOT")"
rm -f "$SHOT"
RASTER="${VIREFSAM_SCREENSHOT_RASTER:-$ROOT/../shared/data/oam_mosaics/kampala.tif}"
[ -f "$RASTER" ] || { echo "The sample raster $RASTER is missing (../shared/data)." >&2; exit 1; }
RASTER="$(cd "$(dirname "$RASTER")" && pwd)/$(basename "$RASTER")"
STATUS="$BUILD/screenshot.status"
rm -f "$STATUS"
export VIREFSAM_SCREENSHOT="$SHOT" VIREFSAM_SCREENSHOT_RASTER="$RASTER" VIREFSAM_SCREENSHOT_STATUS="$STATUS"
export QT_QPA_PLATFORM=xcb
export XDG_RUNTIME_DIR="${XDG_RUNTIME_DIR:-$BUILD/runtime}"
mkdir -p "$XDG_RUNTIME_DIR" && chmod 700 "$XDG_RUNTIME_DIR"
LOG="$BUILD/screenshot.log"
echo "screenshot: starting QGIS under Xvfb (log: ${LOG#$ROOT/})"
set +e
CODE="$BUILD/screenshot.py"
write_screenshot_code "$CODE"
timeout 420 xvfb-run -a -s "-screen 0 1600x1000x24" \
  qgis "${QGIS_ARGS[@]}" --code "$CODE" "${ARGS[@]}" >"$LOG" 2>&1
rc=$?
set -e
if [ -s "$SHOT" ] && grep -q '^ok' "$STATUS" 2>/dev/null; then
  echo "screenshot: $(cat "$STATUS") -> ${SHOT}"
  exit 0
fi
echo "screenshot failed (QGIS exit code $rc); last lines of $LOG:" >&2
tail -n 30 "$LOG" >&2 || true
[ -f "$STATUS" ] && cat "$STATUS" >&2
exit 1
