# qborg: `make demo` runs the whole system once in the lab; `make test` runs
# every test. Both install what they need (Debian packages, a venv) first.
SHELL := /bin/bash
PYTHON ?= /usr/bin/python3
VENV ?= .venv
VPY := $(VENV)/bin/python
DEB_PACKAGES := borgbackup borgmatic openssh-server openssh-client cron sudo \
	python3-venv python3-paramiko python3-passlib python3-cryptography python3-yaml \
	python3-pykeepass keepassxc rpm
PYTEST_ARGS ?=
# the current borgmatic from PyPI, for the lab's vm-work (its /usr/local/bin):
# a venv of Debian's /usr/bin/python3 in a world-readable place, so that the
# lab's qube users can run it
BORGMATIC_LATEST ?= /opt/qborg-test/borgmatic-latest
# the newest borgmatic tested; raise it (or set BORGMATIC_LATEST_SPEC=borgmatic) to try a newer one
BORGMATIC_LATEST_SPEC ?= borgmatic==2.1.10

.PHONY: all deps venv borgmatic-latest demo test unit lint lab-up lab-down clean dist rpm

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

$(BORGMATIC_LATEST)/.installed: | deps
	install -d -m 0755 $(dir $(BORGMATIC_LATEST))
	test -x $(BORGMATIC_LATEST)/bin/python || /usr/bin/python3 -m venv $(BORGMATIC_LATEST)
	$(BORGMATIC_LATEST)/bin/python -m pip install -q --upgrade '$(BORGMATIC_LATEST_SPEC)'
	chmod -R a+rX $(BORGMATIC_LATEST)
	touch $@

borgmatic-latest: $(BORGMATIC_LATEST)/.installed

demo: deps venv
	$(VPY) lab/demo.py

test: deps venv borgmatic-latest
	QBORG_BORGMATIC_LATEST=$(BORGMATIC_LATEST)/bin/borgmatic $(VPY) -m pytest $(PYTEST_ARGS)

unit: venv
	$(VPY) -m pytest tests/unit $(PYTEST_ARGS)

lab-up: deps venv
	$(VPY) lab/qborg_lab.py up

lab-down: venv
	$(VPY) lab/qborg_lab.py down

clean:
	rm -rf $(VENV) .pytest_cache dist

# dom0's install: dist/qborg-VERSION.tar.gz (paths relative to /srv: unpack
# with `tar -xzf ... -C /srv`) and dist/qborg.spec (rpm/qborg.spec.in)
DIST ?= dist
SOURCE_DATE_EPOCH ?= $(shell git log -1 --format=%ct 2>/dev/null)
export SOURCE_DATE_EPOCH

dist:
	$(PYTHON) tools/qborg_dist.py --out $(DIST)

rpm: dist | deps
	rpmbuild -bb --define "_topdir $(abspath $(DIST))/rpmbuild" \
		--define "_sourcedir $(abspath $(DIST))" --define "_rpmdir $(abspath $(DIST))" \
		$(DIST)/qborg.spec
