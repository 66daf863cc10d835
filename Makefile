# The README's two commands: `make demo` and `make test`. Both set up what they
# need: a .venv with the project, and (when run as root) the Debian packages
# for the real servers the tests and the demo start.

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
DEB_PACKAGES := orthanc orthanc-dicomweb dcmtk mariadb-server systemd
PYTEST_ARGS ?=

.PHONY: test unit integration demo bench lint typecheck deps venv clean

test: deps venv  ## everything: lint, unit + integration tests against real servers
	$(BIN)/ruff check cxr_daemon tests bench
	$(BIN)/pytest $(PYTEST_ARGS)

unit: venv  ## fast tests, fakes only
	$(BIN)/pytest tests/unit $(PYTEST_ARGS)

integration: deps venv  ## real Orthanc, MariaDB, S3 emulator, model server
	$(BIN)/pytest tests/integration $(PYTEST_ARGS)

demo: deps venv  ## local sandbox: sample CXRs through the whole pipeline
	$(BIN)/cxrd demo

bench: deps venv  ## benchmarks, writes bench/results.json
	$(BIN)/python bench/run.py $(BENCH_ARGS)

lint: venv
	$(BIN)/ruff check cxr_daemon tests
	$(BIN)/ruff format --check cxr_daemon tests

typecheck: venv
	$(BIN)/pip install -q -e '.[typing]'
	$(BIN)/mypy

# Debian packages, installed only when missing and only as root (CI, a fresh
# machine); a user without root gets skips with the reason instead.
deps:
	@if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	  missing=""; \
	  for p in $(DEB_PACKAGES); do \
	    dpkg-query -W -f='$${Status}' $$p 2>/dev/null | grep -q "install ok installed" || missing="$$missing $$p"; \
	  done; \
	  if [ -n "$$missing" ]; then \
	    echo "installing Debian packages:$$missing"; \
	    apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends $$missing; \
	  fi; \
	fi

venv: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[test,lint,demo]'
	touch $@

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache .mypy_cache *.egg-info
