# Cellblock: `make run` starts the system on this machine, `make test` runs every test.
# Both install what is missing first (Debian packages with apt-get, Python packages into
# .venv/), and are safe to run again.

SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# Debian packages the system and its tests use. gcc and libc6-dev build the sandbox's static
# init; python3 is the interpreter the sandbox offers to submissions.
APT_PACKAGES := gcc libc6-dev python3 python3-venv redis-server nix-bin busybox-static nodejs
# The folders that setup.py maps onto cellblock.* (see shared/DESIGN.md).
PARTS := service executor cachebuilder kernel server_ext
STATE_DIR ?= $(CURDIR)/state

.PHONY: run test check lint typecheck bench system-packages python-packages clean

# The whole system on this machine (Redis, the service, executors, builders) until Ctrl-C.
run: system-packages python-packages
	$(BIN)/cellblock up --state-dir $(STATE_DIR)

test: system-packages python-packages check
	$(BIN)/pytest -q

check: lint typecheck

lint: python-packages
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

# mypy does not follow setup.py's package_dir mapping, so it checks a tree of links that
# lays the folders out as the installed cellblock package.
typecheck: python-packages
	@rm -rf .build/typing && mkdir -p .build/typing/cellblock
	@ln -s $(CURDIR)/cellblock/*.py .build/typing/cellblock/
	@for part in $(PARTS); do ln -s $(CURDIR)/$$part .build/typing/cellblock/$$part; done
	$(BIN)/mypy .build/typing/cellblock

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

python-packages: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml setup.py
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[dev]'
	@# An editable install skips the wheel's shared data: the kernelspec and the server
	@# extension's enabling config, which a plain `pip install` puts in place.
	$(BIN)/cellblock kernel install --sys-prefix
	mkdir -p $(VENV)/etc/jupyter/jupyter_server_config.d
	cp server_ext/jupyter-config/cellblock.json $(VENV)/etc/jupyter/jupyter_server_config.d/
	@touch $@

clean:
	rm -rf $(VENV) .build *.egg-info
