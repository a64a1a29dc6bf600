# The targets CI runs; each creates or reuses the local virtualenv in .venv.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-stamp
DEMO   ?= demo-federation

.PHONY: demo test typecheck bench clean

$(STAMP): setup.cfg pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	touch $(STAMP)

## demo: start a local federation, upload the examples, query, download, stop
demo: $(STAMP)
	$(PY) examples/demo.py $(DEMO)

## test: the whole suite (real servers on loopback, real DICOM), then the type check
test: $(STAMP)
	$(PY) -m pytest -q
	$(PY) -m mypy dgf metaserver ioserver

typecheck: $(STAMP)
	$(PY) -m mypy dgf metaserver ioserver

## bench: the federation benchmark (results go to bench/RESULTS.md by hand)
bench: $(STAMP)
	$(PY) bench/federation.py

clean:
	rm -rf $(VENV) $(DEMO) .pytest_cache .mypy_cache .hypothesis build *.egg-info
