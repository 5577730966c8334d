# imago for Python: set-up, main job, tests.
#   make run    set up .venv and run the main job (a tour of the imago command; DIR=path keeps its files)
#   make test   set up .venv (and the reference tools) and run every check: ruff, mypy, pytest

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# The in-repo distributions are the directories: the core and every plugin with a pyproject.toml.
DISTS := core $(sort $(patsubst %/pyproject.toml,%,$(wildcard plugins/*/pyproject.toml)))
PYTEST_ARGS ?=

.PHONY: setup run test lint typecheck pytest tools qemu bench clean dists fuzz

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

# The reference the tests compare against, from Debian's packages: QEMU's tools (qemu-img,
# qemu-io, qemu-nbd), and the NBD peers (nbdkit, nbd-server, nbdinfo/nbdcopy, python3-libnbd).
TOOLS := qemu-img:qemu-utils qemu-io:qemu-utils qemu-nbd:qemu-utils nbdkit:nbdkit nbd-server:nbd-server \
	nbdinfo:libnbd-bin nbdcopy:libnbd-bin /usr/lib/python3/dist-packages/nbd.py:python3-libnbd
tools:
	@missing=$$(for tool in $(TOOLS); do command -v $${tool%%:*} >/dev/null || [ -e $${tool%%:*} ] || echo $${tool#*:}; done | sort -u); \
	[ -z "$$missing" ] || { \
		echo "installing" $$missing; \
		SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
		$$SUDO apt-get update -qq && $$SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null; }

# The older name of the target above.
qemu: tools

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: setup
	$(BIN)/mypy

pytest: setup tools
	$(BIN)/python -m pytest -n 2 $(PYTEST_ARGS)

test: lint typecheck pytest

# Fuzzing (fuzz/README.md): TARGET (qcow2_read, qcow2_write, raw_read, cli_info, cli_check),
# MINUTES per process, JOBS processes sharing one corpus.
TARGET ?= qcow2_read
MINUTES ?= 10
JOBS ?= 1
fuzz: setup tools
	$(BIN)/python -m fuzz $(TARGET) --minutes $(MINUTES) --jobs $(JOBS)

bench: setup tools
	$(BIN)/python bench/bench_raw.py
	$(BIN)/python bench/bench_qcow2.py
	$(BIN)/python bench/bench_qcow2_write.py
	$(BIN)/python bench/bench_startup.py
	$(BIN)/python bench/bench_map.py
	$(BIN)/python bench/bench_convert.py
	$(BIN)/python bench/bench_compressed.py
	$(BIN)/python bench/bench_hostile.py
	$(BIN)/python bench/bench_nbd_server.py
	$(BIN)/python bench/bench_nbd_client.py
	$(BIN)/python bench/bench_vmdk.py
	$(BIN)/python bench/bench_formats.py

# The list above, one per line (tests/test_workspace.py compares it with the tree).
dists:
	@printf '%s\n' $(DISTS)

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache .hypothesis
