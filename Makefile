# make demo: set up a venv and run the main job (train the toy models on the built-in data, sample).
# make test: set up the venv if needed and run the test suite.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python

.PHONY: demo test venv clean

$(VENV)/.installed: requirements.txt pyproject.toml
	$(PYTHON) -m venv $(VENV)
	# torch first, pinned: an unpinned torch can pull a multi-GB CUDA build; 2.13.0 is a CPU build here
	$(PY) -m pip install -q torch==2.13.0 || $(PY) -m pip install -q "torch>=2.4"
	$(PY) -m pip install -q -r requirements.txt
	$(PY) -m pip install -q --no-deps --no-build-isolation -e .
	touch $@

venv: $(VENV)/.installed

# Trains the toy stages in turn (dVAE, CLIP, DALL-E 1 transformer, prior, decoder, upsampler) and samples
# both pipelines: nanodalle/demo.py.
# Re-running skips a stage whose checkpoint is complete, and resumes one that was interrupted.
demo: venv
	$(PY) -m nanodalle.demo

test: venv
	$(PY) -m pytest -q

clean:
	rm -rf out
