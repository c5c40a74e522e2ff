# san: build, test, demo. `make test` and `make demo` are the README's quick start.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
DATA ?= $(CURDIR)/data
API ?= 127.0.0.1:8080
PORTAL ?= 127.0.0.1:3260
# Debian packages the build and the tests need.
# The LIO tests boot Debian's kernel under QEMU (vagrant/qemu_vm.py); the guest uses this machine's programs
# (tcmu-runner and dbus: the conformance test's second TCMU handler; targetcli-fb with python3-gi: stock targetcli,
# which lists user:san over D-Bus).
VM_PACKAGES := qemu-system-x86 linux-image-amd64 busybox-static cpio kmod open-iscsi fio e2fsprogs util-linux \
	vagrant vagrant-libvirt tcmu-runner dbus targetcli-fb python3-gi
APT_PACKAGES := python3 python3-venv python3-dev gcc make libiscsi-bin qemu-utils qemu-block-extra man-db systemd \
	$(VM_PACKAGES)
# `make demo` needs only these: it builds san and runs it (no test tools, no VM).
DEMO_PACKAGES := python3 python3-venv python3-dev gcc make
# Only the benchmarks need these: tgtd is the peer bench/iscsi_vs_tgt.py measures against.
BENCH_PACKAGES := tgt

.PHONY: docs test demo demo-deps deps bench-deps apt venv lint unit bench clean lock

deps:
	@$(MAKE) --no-print-directory apt PACKAGES="$(APT_PACKAGES)"

demo-deps:
	@$(MAKE) --no-print-directory apt PACKAGES="$(DEMO_PACKAGES)"

bench-deps:
	@$(MAKE) --no-print-directory apt PACKAGES="$(APT_PACKAGES) $(BENCH_PACKAGES)"

apt:
	@missing=""; for p in $(PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -z "$$missing" ]; then exit 0; fi; \
	if [ "$$(id -u)" = 0 ]; then \
		apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends $$missing; \
	else \
		echo "missing Debian packages; as root run: apt-get update && apt-get install -y$$missing"; exit 1; \
	fi

# Every Python package make installs (build requirements included) is pinned in constraints.txt; `make lock`
# refreshes it from the newest releases on purpose (review the diff, run make test, commit it).
$(VENV)/.installed: pyproject.toml setup.py constraints.txt san/_fastmap.pyx san/_fastmap.pxd targetcli-ext/pyproject.toml | deps
	$(PYTHON) -m venv $(VENV)
	PIP_CONSTRAINT=$(CURDIR)/constraints.txt $(PY) -m pip install --upgrade pip
	PIP_CONSTRAINT=$(CURDIR)/constraints.txt $(PY) -m pip install -e '.[test]' -e ./targetcli-ext
	touch $@

lock:
	rm -rf build/lock-venv
	$(PYTHON) -m venv build/lock-venv
	build/lock-venv/bin/pip install --upgrade pip wheel
	build/lock-venv/bin/pip install '.[test]'
	build/lock-venv/bin/pip freeze --all --exclude-editable | grep -vE '^san( |==)' > constraints.txt
	rm -rf build/lock-venv

venv: $(VENV)/.installed

lint: venv
	$(VENV)/bin/ruff check san tests bench vagrant targetcli-ext
	$(VENV)/bin/mypy

# The man page and bash completion, from the CLI's parser (commit the result; tests/test_cli_edges.py checks it).
docs: venv
	$(PY) -m san.cli.generate docs

unit: venv
	$(PY) -m pytest

test: lint unit

bench: venv bench-deps
	$(PY) bench/fastmap.py
	$(PY) bench/iscsi_vs_tgt.py
	$(PY) bench/sync_vs_tgt.py
	$(PY) bench/cluster.py
	$(PY) bench/lio_vs_fileio.py
	$(PY) bench/metrics_overhead.py

# The demo's own install: san and its run-time packages only, pinned like the rest (make venv adds the test tools).
$(VENV)/.demo: pyproject.toml setup.py constraints.txt san/_fastmap.pyx san/_fastmap.pxd | demo-deps
	$(PYTHON) -m venv $(VENV)
	PIP_CONSTRAINT=$(CURDIR)/constraints.txt $(PY) -m pip install --upgrade pip
	PIP_CONSTRAINT=$(CURDIR)/constraints.txt $(PY) -m pip install -e .
	touch $@

# Variables: DATA (the data directory, default ./data), API (HOST:PORT of the management API, default
# 127.0.0.1:8080), PORTAL (HOST:PORT of the iSCSI portal, default 127.0.0.1:3260).
demo: $(VENV)/.demo
	@echo "san is $(CURDIR)/$(VENV)/bin/san (add $(CURDIR)/$(VENV)/bin to PATH, or call it by that path)"
	$(VENV)/bin/san demo --data $(DATA) --api $(API) --portal $(PORTAL)

clean:
	rm -rf $(VENV) build bench/build *.egg-info
	find san -name '*.so' -delete -o -name '*.c' -delete
