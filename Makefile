# One-command set-up: `make demo` and `make test` each build everything they need, idempotently.
# The venv is made from Debian's python3 with system site-packages, so PyQGIS (python3-qgis) is visible in it.
# Dependencies come from requirements.lock (uv pip compile pyproject.toml --extra dev --extra torch --extra train --extra cluster --extra bench --extra openvino --extra quantize), installed with uv:
# uv ignores pip's local find-links, where a CPU-only torch build lives that can't run torchvision's ops.
# --compile-bytecode: .pyc files written once at install; without them (and with PYTHONDONTWRITEBYTECODE set, as on
# the development machine) every engine process the tests and benchmarks start recompiles torch and torchvision, seconds each.

PYTHON_SYS ?= /usr/bin/python3
VENV := .venv
PY := $(VENV)/bin/python
UV_VERSION := 0.13.9
STAMP := $(VENV)/.installed

.PHONY: venv qgis demo test test-fast lint bench plugin lock clean

venv: $(STAMP)

$(STAMP): requirements.lock pyproject.toml
	@$(PYTHON_SYS) -c "import ensurepip" 2>/dev/null || { apt-get update -qq && \
	  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-venv >/dev/null; }
	test -x $(PY) || $(PYTHON_SYS) -m venv --system-site-packages $(VENV)
	$(PY) -m pip install --quiet "uv==$(UV_VERSION)"
	$(VENV)/bin/uv pip install --quiet --compile-bytecode --python $(PY) -r requirements.lock
	$(VENV)/bin/uv pip install --quiet --python $(PY) --no-deps -e .
	touch $(STAMP)

# QGIS from Debian's packages, only when missing: PyQGIS for the plugin tests, the desktop and qgis_process (the
# Xvfb screenshot and qgis_process tests), Xvfb, and gdal-bin (gdal2tiles builds the local XYZ layer of a test).
QGIS_PACKAGES = python3-qgis qgis xvfb gdal-bin
qgis:
	@{ $(PYTHON_SYS) -c "import qgis.core" 2>/dev/null && command -v qgis >/dev/null && command -v xvfb-run \
	  >/dev/null && command -v gdal2tiles.py >/dev/null; } || { \
	  echo "installing $(QGIS_PACKAGES) from Debian's packages"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $(QGIS_PACKAGES) >/dev/null; }

demo: venv
	$(PY) examples/run_demo.py --out out

test: venv qgis
	$(PY) -m pytest -q

lint: venv
	$(VENV)/bin/ruff check .

# The zip QGIS's "Plugins > Install from ZIP" takes: dist/delineate-VERSION.zip (stdlib only, no venv needed).
plugin:
	$(PYTHON_SYS) qgis_plugin/build_zip.py

# Benchmarks (bench/, docs/benchmarks.md): JSON, markdown tables and PNG plots into bench/results.
# `make bench QUICK=1` is the smoke test (minutes); the full run takes about an hour on 2 cores.
BENCH_FLAGS = $(if $(QUICK),--quick,)
bench: venv
	$(PY) bench/scan.py $(BENCH_FLAGS) --out bench/results
	$(PY) bench/backbones.py $(BENCH_FLAGS) --out bench/results
	$(PY) bench/end_to_end.py $(BENCH_FLAGS) --out bench/results
	$(PY) bench/cluster.py $(BENCH_FLAGS) --out bench/results
	$(PY) bench/outline_latency.py $(BENCH_FLAGS) --out bench/results

lock:
	$(VENV)/bin/uv pip compile pyproject.toml --extra dev --extra torch --extra train --extra cluster --extra bench --extra openvino --extra quantize --python-version 3.11 \
	  --python-platform x86_64-manylinux_2_28 -o requirements.lock

clean:
	rm -rf out build dist *.egg-info .pytest_cache
