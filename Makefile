# imago for Python: set-up, main job, tests.
#   make run    set up .venv and run the main job (a tour of the imago command; DIR=path keeps its files)
#   make test   set up .venv (and qemu-utils) and run every check: ruff, mypy, pytest

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# The in-repo distributions are the directories: the core and every plugin with a pyproject.toml.
DISTS := core $(sort $(patsubst %/pyproject.toml,%,$(wildcard plugins/*/pyproject.toml)))
PYTEST_ARGS ?=

.PHONY: setup run test lint typecheck pytest qemu bench clean dists fuzz

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

# The root distribution pulls in every in-repo distribution plus the dev tools; the second
# step turns the in-repo ones into editable installs.
$(VENV)/.installed: $(BIN)/python pyproject.toml hatch_build.py $(foreach d,$(DISTS),$(d)/pyproject.toml)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check '.[dev]'
	$(BIN)/python -m pip install --quiet --disable-pip-version-check --no-deps $(foreach d,$(DISTS),-e $(d))
	touch $@

setup: $(VENV)/.installed

# DIR: where the tour leaves its images (default: a temporary directory, removed afterwards).
run: setup
	$(BIN)/python examples/tour.py $(DIR)

# qemu-img and qemu-io are the reference the tests compare against.
qemu:
	@command -v qemu-img >/dev/null && command -v qemu-io >/dev/null || { \
		echo "installing qemu-utils"; \
		SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
		$$SUDO apt-get update -qq && $$SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq qemu-utils >/dev/null; }

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: setup
	$(BIN)/mypy

pytest: setup qemu
	$(BIN)/python -m pytest -n 2 $(PYTEST_ARGS)

test: lint typecheck pytest

# Fuzzing (fuzz/README.md): TARGET (qcow2_read, qcow2_write, raw_read, cli_info, cli_check),
# MINUTES per process, JOBS processes sharing one corpus.
TARGET ?= qcow2_read
MINUTES ?= 10
JOBS ?= 1
fuzz: setup qemu
	$(BIN)/python -m fuzz $(TARGET) --minutes $(MINUTES) --jobs $(JOBS)

bench: setup qemu
	$(BIN)/python bench/bench_raw.py
	$(BIN)/python bench/bench_qcow2.py
	$(BIN)/python bench/bench_qcow2_write.py
	$(BIN)/python bench/bench_startup.py
	$(BIN)/python bench/bench_map.py
	$(BIN)/python bench/bench_convert.py
	$(BIN)/python bench/bench_compressed.py
	$(BIN)/python bench/bench_hostile.py

# The list above, one per line (tests/test_workspace.py compares it with the tree).
dists:
	@printf '%s\n' $(DISTS)

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache .hypothesis
