# Developer targets. Override the interpreter with `make test PYTHON=/path/to/python`.
PYTHON ?= python3
PYTEST_ARGS ?=
BENCH_ARGS ?=

.PHONY: help build test bench sanitize docs clean

help:
	@echo "make build      build the C extension in place"
	@echo "make test       build, then run the test suite (PYTEST_ARGS=...)"
	@echo "make bench      build, then run every benchmarks/*.py (BENCH_ARGS=...)"
	@echo "make sanitize   run the tests against an ASan+UBSan build in a temporary copy"
	@echo "make docs       build the HTML documentation into docs/_build/html (warnings are errors)"
	@echo "make clean      remove the in-place build and the built documentation"

build:
	$(PYTHON) setup.py -q build_ext --inplace

test: build
	$(PYTHON) -m pytest $(PYTEST_ARGS)

bench: build
	@set -e; found=0; \
	for f in benchmarks/*.py; do \
		[ -e "$$f" ] || continue; found=1; \
		echo "== $$f"; \
		PYTHONPATH="$(CURDIR)$${PYTHONPATH:+:$$PYTHONPATH}" $(PYTHON) "$$f" $(BENCH_ARGS); \
	done; \
	[ $$found = 1 ] || echo "no benchmarks in benchmarks/"

sanitize:
	PYTHON="$(PYTHON)" scripts/sanitize.sh $(PYTEST_ARGS)

docs: build
	$(PYTHON) -m sphinx -W --keep-going -b html docs docs/_build/html

clean:
	rm -rf build topkattn/_core*.so topkattn/_cuda*.so docs/_build docs/api/generated docs/notebooks
