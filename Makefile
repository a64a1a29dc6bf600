# The targets CI runs; each creates or reuses the local virtualenv in .venv.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-stamp
DEMO   ?= demo-federation

.PHONY: demo test lint typecheck bench clean system-deps

# Debian packages the tests use: dcmtk (xml2dcm for the XML export round trip; echoscu, storescu,
# findscu, getscu, movescu and storescp against 'dgf dicom serve'), postgresql (the
# engine contract runs on a real server, started by the tests themselves), fuse3 (dgf mount,
# mounted for real), attr (getfattr on the mount), faketime (a site whose clock is off),
# iproute2 (a federation across network namespaces), chromium and chromium-driver (the OHIF
# viewer in a real browser), npm ('dgf web' fetches the viewer once) and strace (counts the
# mount's FUSE calls).

$(STAMP): setup.cfg pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	touch $(STAMP)

## demo: start a local federation, upload the examples, query, download, stop
demo: $(STAMP)
	$(PY) examples/demo.py $(DEMO)

## system-deps: install the Debian packages the tests need (as root), or say which are missing
system-deps:
	@missing=""; \
	command -v xml2dcm >/dev/null 2>&1 || missing="$$missing dcmtk"; \
	ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || missing="$$missing postgresql"; \
	command -v fusermount3 >/dev/null 2>&1 || missing="$$missing fuse3"; \
	command -v getfattr >/dev/null 2>&1 || missing="$$missing attr"; \
	ls /usr/lib/*/faketime/libfaketime.so.1 >/dev/null 2>&1 || missing="$$missing faketime"; \
	command -v ip >/dev/null 2>&1 || missing="$$missing iproute2"; \
	command -v chromium >/dev/null 2>&1 || missing="$$missing chromium"; \
	command -v chromedriver >/dev/null 2>&1 || missing="$$missing chromium-driver"; \
	command -v npm >/dev/null 2>&1 || missing="$$missing npm"; \
	command -v strace >/dev/null 2>&1 || missing="$$missing strace"; \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    DEBIAN_FRONTEND=noninteractive apt-get update -qq && apt-get install -y -qq $$missing; \
	  else echo "make test needs Debian packages:$$missing (sudo apt-get install$$missing)" >&2; exit 1; fi; \
	fi

## test: the whole suite (real servers on loopback, real DICOM), then lint and type check
test: $(STAMP) system-deps
	$(PY) -m pytest -q
	$(PY) -m ruff check .
	$(PY) -m mypy dgf metaserver ioserver bench

lint: $(STAMP)
	$(PY) -m ruff check .

typecheck: $(STAMP)
	$(PY) -m mypy dgf metaserver ioserver bench

## bench: the federation benchmark (results go to bench/RESULTS.md by hand)
bench: $(STAMP)
	$(PY) bench/federation.py

clean:
	rm -rf $(VENV) $(DEMO) .pytest_cache .mypy_cache .hypothesis build *.egg-info
