# Cellblock: `make run` starts the classroom (JupyterLab and the whole system) on this
# machine, `make test` runs every test.
# Both install what is missing first (Debian packages with apt-get, Python packages into
# .venv/), and are safe to run again.

SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# Debian packages the system and its tests use. gcc and libc6-dev build the sandbox's static
# init; python3 is the interpreter the sandbox offers to submissions. nodejs builds the
# JupyterLab extension with its bundled npm (the machine's NodeSource nodejs conflicts with
# Debian's npm package, so that is not listed); chromium runs the browser tests (tests/e2e).
# btrfs-progs makes the file system of the working directories (executor/disk.py); iproute2
# makes the network namespaces of the simulated hosts (tests/faults/hostio.py).
APT_PACKAGES := gcc libc6-dev python3 python3-venv redis-server nix-bin busybox-static nodejs chromium \
	btrfs-progs iproute2
# The development install is setuptools' strict editable one: the package as a wheel lays it
# out, as a tree of links to the files here under build/, which the venv's .pth puts on the
# path (see python-packages). SOURCES lists the files of the part folders, LINKED says when
# the tree was last made; LINK_TREE is the tree the .pth names.
STRICT := --config-settings editable_mode=strict
SOURCES := build/sources.txt
LINKED := build/linked
LINK_TREE = $$(cat $(VENV)/lib/python3*/site-packages/__editable__.cellblock-*.pth)
STATE_DIR ?= $(CURDIR)/state
LABEXT := server_ext/labextension
LABEXT_INSTALLED := $(VENV)/share/jupyter/labextensions/cellblock-launcher

.PHONY: run test check lint typecheck imports bench system-packages python-packages clean FORCE

# The classroom on this machine until Ctrl-C: JupyterLab on notebooks/, whose Cellblock
# extension starts the whole system with it (`cellblock up`: Redis, the service, executors,
# a cache builder; state in $(STATE_DIR)) and stops it with it. Open the URL it prints.
# JupyterLab refuses root unless told, and the sandbox wants root.
run: system-packages python-packages
	$(BIN)/jupyter lab --ServerApp.root_dir=notebooks --ip=127.0.0.1 --no-browser \
		--Cellblock.start_local=True --Cellblock.state_dir=$(STATE_DIR) \
		$(if $(filter 0,$(shell id -u)),--allow-root)

# Hypothesis caches what it learns (constants, Unicode tables) in ./.hypothesis even with no
# example database: the build folder keeps the working tree clean.
test: system-packages python-packages check
	HYPOTHESIS_STORAGE_DIRECTORY=.build/hypothesis $(BIN)/pytest -q

check: lint typecheck imports

lint: python-packages
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

# mypy looks for cellblock in the working directory before site-packages, and there the
# folder cellblock/ is only the top of the package: it reads the venv's link tree, which
# MYPYPATH puts first. Its cache is the tree's own, never mixed with that of a mypy run that saw the folder.
typecheck: python-packages
	MYPYPATH=$(LINK_TREE) $(BIN)/mypy --cache-dir build/mypy -p cellblock

# The architecture contract, [tool.importlinter] in pyproject.toml. lint-imports, too, looks
# for cellblock in its working directory first: it runs in the link tree.
imports: python-packages
	cd $(LINK_TREE) && $(CURDIR)/$(BIN)/lint-imports --no-cache --no-logo $(CURDIR)/pyproject.toml

bench: system-packages python-packages
	$(BIN)/python bench/sandbox.py

system-packages:
	@missing=""; for p in $(APT_PACKAGES); do \
		dpkg-query -W -f='$${Status}' $$p 2>/dev/null | grep -q "ok installed" || missing="$$missing $$p"; \
	done; \
	if [ -n "$$missing" ]; then \
		echo "installing Debian packages:$$missing"; \
		apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q $$missing; \
	fi

python-packages: $(VENV)/.installed $(LINKED) $(LABEXT_INSTALLED)/package.json

# setuptools and wheel: the build system's requirements, for the reinstalls below, which
# build without isolation (nothing to fetch).
$(VENV)/.installed: pyproject.toml setup.py
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip 'setuptools>=68' wheel
	$(BIN)/pip install -q -e '.[dev]' $(STRICT)
	@# An editable install skips the wheel's shared data: the kernelspec and the server
	@# extension's enabling config, which a plain `pip install` puts in place.
	$(BIN)/cellblock kernel install --sys-prefix
	mkdir -p $(VENV)/etc/jupyter/jupyter_server_config.d
	cp server_ext/jupyter-config/cellblock.json $(VENV)/etc/jupyter/jupyter_server_config.d/
	@touch $@

# The files of the part folders ([tool.setuptools.package-dir] in pyproject.toml) that git
# would track (tracked or new, not ignored), one a line. Rewritten only when the list changes,
# so its date is when a file last came or went: a new module gets into the link tree then.
$(SOURCES): FORCE | $(VENV)/.installed
	@mkdir -p $(@D)
	@folders=$$($(BIN)/python -c 'import tomllib; print(*tomllib.load(open("pyproject.toml", "rb"))["tool"]["setuptools"]["package-dir"].values())') && \
	{ git ls-files --cached --others --exclude-standard -- $$folders 2>/dev/null || \
		find $$folders -type f -not -path '*/__pycache__/*' -not -path '*/node_modules/*'; } \
		| while read -r file; do [ -e "$$file" ] && echo "$$file"; done | LC_ALL=C sort -u > $@.new
	@if cmp -s $@.new $@; then rm $@.new; else mv $@.new $@; fi

# The strict install links the files it found one by one: a new file is in the package only
# once it is installed again. Cheaply: the package alone, no dependency, no build isolation.
$(LINKED): $(SOURCES) $(VENV)/.installed
	$(BIN)/pip install -q --no-deps --no-build-isolation -e . $(STRICT)
	@touch $@

FORCE:

# The JupyterLab frontend extension (server_ext/labextension: a launcher card for the status
# page). npm fetches its build tools, jupyter-builder bundles it into $(LABEXT)/build, which
# setup.py ships in the wheel; for the editable venv a copy of that folder installs it. Each
# step reruns only when its inputs change.
$(LABEXT)/node_modules/.installed: $(LABEXT)/package.json $(LABEXT)/package-lock.json
	cd $(LABEXT) && npm ci --no-audit --no-fund
	@touch $@

# `jupyter labextension build` only forwards to this (and finds it through PATH).
$(LABEXT)/build/package.json: $(LABEXT)/node_modules/.installed $(wildcard $(LABEXT)/src/*) \
		$(VENV)/.installed
	$(BIN)/jupyter-builder build $(LABEXT)

$(LABEXT_INSTALLED)/package.json: $(LABEXT)/build/package.json
	rm -rf $(LABEXT_INSTALLED) && mkdir -p $(dir $(LABEXT_INSTALLED))
	cp -r $(LABEXT)/build $(LABEXT_INSTALLED)

clean:
	rm -rf $(VENV) .build build *.egg-info $(LABEXT)/build $(LABEXT)/node_modules
