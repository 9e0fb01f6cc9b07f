# Quick start on a fresh Debian 12 machine, as root:  make demo   |   make test
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMPS := build/stamps
IMAGE_CACHE ?= /var/cache/pyengine/images
NGINX_ARCHIVE := $(IMAGE_CACHE)/nginx-oci.tar
BUSYBOX_ARCHIVE := $(IMAGE_CACHE)/busybox-oci.tar
SOCK := /run/pyengine.sock
PIDFILE := /run/pyengined.pid
DAEMON_LOG := /var/log/pyengined.log
DEMO_NAME := pyengine-demo
DEMO_PORT := 8080
export PYENGINE_HOST := unix://$(SOCK)

.PHONY: setup deps venv images demo daemon stop test lint clean figures captures

setup: deps venv images

deps: $(STAMPS)/apt
$(STAMPS)/apt: Makefile scripts/install-deps.sh
	@mkdir -p $(STAMPS)
	scripts/install-deps.sh
	@touch $@

venv: $(STAMPS)/venv
$(STAMPS)/venv: pyproject.toml setup.py proxy/_forkloop.c proxy/launcher.c proxy/launcher_server.c proxy/launcher.h proxy/forkproto.h $(STAMPS)/apt
	@mkdir -p $(STAMPS)
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q -e '.[test,bench]'
	@touch $@

images: $(NGINX_ARCHIVE) $(BUSYBOX_ARCHIVE)
$(NGINX_ARCHIVE): | $(STAMPS)/venv
	@mkdir -p $(IMAGE_CACHE)
	$(BIN)/python -m engine.images.build nginx --out $@
$(BUSYBOX_ARCHIVE): | $(STAMPS)/venv
	@mkdir -p $(IMAGE_CACHE)
	$(BIN)/python -m engine.images.build busybox --out $@

daemon: setup
	@if ! $(BIN)/pyengine version >/dev/null 2>&1; then \
		echo "starting pyengined (log: $(DAEMON_LOG))"; \
		setsid $(BIN)/pyengined -H unix://$(SOCK) --pidfile $(PIDFILE) \
			>>$(DAEMON_LOG) 2>&1 < /dev/null & \
		for i in $$(seq 100); do $(BIN)/pyengine version >/dev/null 2>&1 && break; sleep 0.1; done; \
	fi
	@$(BIN)/pyengine version >/dev/null || { tail -20 $(DAEMON_LOG); exit 1; }

demo: daemon
	@$(BIN)/pyengine images | grep -q '^nginx ' || $(BIN)/pyengine load -i $(NGINX_ARCHIVE)
	@$(BIN)/pyengine rm -f $(DEMO_NAME) >/dev/null 2>&1 || true
	$(BIN)/pyengine run -d --name $(DEMO_NAME) -p $(DEMO_PORT):80 nginx
	@for i in $$(seq 100); do curl -fsS -o /dev/null http://127.0.0.1:$(DEMO_PORT)/ && break; sleep 0.1; done
	curl -sS -i http://127.0.0.1:$(DEMO_PORT)/ | head -n 20
	@$(BIN)/pyengine ps
	@echo; echo "nginx answers on http://127.0.0.1:$(DEMO_PORT)/ -- 'make stop' removes it all."

stop:
	@-$(BIN)/pyengine rm -f $(DEMO_NAME) 2>/dev/null
	@if [ -f $(PIDFILE) ]; then \
		pid=$$(cat $(PIDFILE)); kill $$pid 2>/dev/null; \
		for i in $$(seq 150); do kill -0 $$pid 2>/dev/null || break; sleep 0.1; done; \
		echo "pyengined stopped"; \
	else echo "pyengined is not running"; fi

test: setup
	$(BIN)/pytest -v -rs tests

lint: venv
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

# The pictures of docs/: docs/figures/*.dot (graphviz) rendered to the SVG beside each.
FIGURES := $(patsubst %.dot,%.svg,$(wildcard docs/figures/*.dot))
figures: $(FIGURES)
docs/figures/%.svg: docs/figures/%.dot
	dot -Tsvg $< -o $@

# The captured listings of docs/*.md, regenerated from a real run (the lab: needs root).
captures: setup
	$(BIN)/python docs/capture.py

clean: stop
	rm -rf build $(VENV)

# Check vagrant/Vagrantfile without booting anything: Ruby syntax, then Vagrant's own validation
# (offline). Installs Debian's vagrant without its recommends (no libvirt, no qemu) if missing.
.PHONY: lab-validate
lab-validate:
	@if ! command -v vagrant >/dev/null || ! command -v ruby >/dev/null; then \
		apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q \
			--no-install-recommends -o DPkg::Lock::Timeout=600 vagrant ruby; \
	fi
	ruby -c vagrant/Vagrantfile
	cd vagrant && VAGRANT_CHECKPOINT_DISABLE=1 vagrant validate --ignore-provider

# The VM lab (docs/lab.md, "The VM lab"): its Debian 12 box, built offline from Debian packages
# and cached under /var/cache/pyengine/boxes (needs root); then the two VMs under Vagrant.
.PHONY: lab-box lab-vm lab-vm-down
lab-box: setup
	$(BIN)/python -m lab box
lab-vm: lab-box
	$(BIN)/python -m lab vm up
	$(BIN)/python -m lab vm exercise
lab-vm-down:
	$(BIN)/python -m lab vm down
