# qborg: `make demo` runs the whole system once in the lab; `make test` runs
# every test. Both install what they need (Debian packages, a venv) first.
SHELL := /bin/bash
PYTHON ?= /usr/bin/python3
VENV ?= .venv
VPY := $(VENV)/bin/python
DEB_PACKAGES := borgbackup borgmatic openssh-server openssh-client cron sudo \
	python3-venv python3-paramiko python3-passlib python3-cryptography python3-yaml
PYTEST_ARGS ?=

.PHONY: all deps venv demo test unit lint lab-up lab-down clean

all: test

deps:
	@missing=""; for p in $(DEB_PACKAGES); do \
		dpkg-query -W -f='$${Status}' $$p 2>/dev/null | grep -q "ok installed" || missing="$$missing $$p"; \
	done; \
	if [ -n "$$missing" ]; then \
		echo "installing Debian packages:$$missing"; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing; \
	fi

$(VENV)/.installed: setup.py | deps
	test -x $(VPY) || $(PYTHON) -m venv $(VENV)
	$(VPY) -m pip install -q --upgrade pip
	$(VPY) -m pip install -q -e '.[test]'
	touch $@

venv: $(VENV)/.installed

demo: deps venv
	$(VPY) lab/demo.py

test: deps venv
	$(VPY) -m pytest $(PYTEST_ARGS)

unit: venv
	$(VPY) -m pytest tests/unit $(PYTEST_ARGS)

lab-up: deps venv
	$(VPY) lab/qborg_lab.py up

lab-down: venv
	$(VPY) lab/qborg_lab.py down

clean:
	rm -rf $(VENV) .pytest_cache
