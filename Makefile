# ViRefSAM for QGIS. Two commands do everything on a fresh Debian 12 machine:
#   make demo   - set up, then segment the bundled sample rasters from the bundled reference
#   make test   - set up, then run the test suite against real QGIS, real rasters and the real embedded SAM
SHELL := /bin/bash
VENV := .venv
PY := $(VENV)/bin/python
OUT ?= out
export QT_QPA_PLATFORM ?= offscreen
export PYTHONDONTWRITEBYTECODE := 1

.PHONY: setup test demo bench gpu-check qgis screenshot train eval clean package

setup:
	@bash scripts/setup.sh

test: setup
	$(PY) -m pytest -q tests

demo: setup
	$(PY) -m core demo --out $(OUT)/demo

bench: setup
	$(PY) -m core bench --out $(OUT)/bench

# On a CUDA machine: setup if needed, demo fp32/fp16, e2e, encoder rows, eval smoke -> $(OUT)/gpu-check/ (< 5 min).
# Offline (no index): python3 scripts/gpu_check.py --wheels DIR --model-file embedded_mobilesam.pt --data DIR
# Without CUDA it says so ("CUDA is absent on this machine") and exits 0; --require-cuda makes that exit 3.
gpu-check:
	$(if $(wildcard $(PY)),$(PY),python3) scripts/gpu_check.py --out $(OUT)/gpu-check

# The real QGIS desktop with this checkout loaded as the plugin `virefsam` (needs a screen).
qgis: setup
	@bash scripts/qgis.sh

# The same under Xvfb: marks a house, clicks Run (the default: shipped adapters) and saves a PNG of the QGIS main
# window with the result on the map and the ViRefSAM dock open.
screenshot: setup
	@bash scripts/qgis.sh --screenshot $(OUT)/screenshot.png --run

# The plugin ZIP for QGIS's Plugins > Install from ZIP (dist/virefsam-<version>.zip; stdlib only, no set-up).
package:
	@python3 scripts/package.py --out dist

clean:
	rm -rf $(OUT) .pytest_cache dist
