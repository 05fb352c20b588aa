# vmferry — see README.md. Everything runs as root on a Debian-family machine.
PY := .venv/bin/python
PYTEST := $(PY) -m pytest

.PHONY: setup demo test test-all bench lint clean

setup:
	@bash scripts/setup.sh

demo: setup
	$(PY) -m vmferry.lab.demo $(if $(KEEP),--keep,)

# A representative set: unit tests and the integration tests not marked slow.
test: setup
	$(PYTEST) -m "not slow" -q

test-all: setup
	$(PYTEST) -q

bench: setup
	$(PY) -m bench.run

lint: setup
	$(PY) -m ruff check src tests bench
	$(PY) -m ruff format --check src tests bench
	$(PY) -m mypy

clean:
	rm -rf .venv .mypy_cache .ruff_cache .pytest_cache
