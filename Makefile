# qborg: `make demo` runs the whole system once in the lab; `make test` runs
# every test. Both install what they need (Debian packages, a venv) first.
SHELL := /bin/bash
PYTHON ?= /usr/bin/python3
VENV ?= .venv
VPY := $(VENV)/bin/python
DEB_PACKAGES := borgbackup borgmatic openssh-server openssh-client cron sudo \
	python3-venv python3-paramiko python3-passlib python3-cryptography python3-yaml \
	python3-pykeepass keepassxc rpm sqlite3 dbus-daemon python3-dbus python3-gi
PYTEST_ARGS ?=
# the current borgmatic from PyPI, for the lab's vm-work (its /usr/local/bin):
# a venv of Debian's /usr/bin/python3 in a world-readable place, so that the
# lab's qube users can run it
BORGMATIC_LATEST ?= /opt/qborg-test/borgmatic-latest
# the newest borgmatic tested; raise it (or set BORGMATIC_LATEST_SPEC=borgmatic) to try a newer one
BORGMATIC_LATEST_SPEC ?= borgmatic==2.1.10
# what salt-lint checks (.salt-lint); yamllint takes every plain YAML file
# (.yamllint) and, in tests/functional/test_lint.py, each .sls as Salt renders it
SALT_FILES := $(wildcard salt/qborg/*.sls salt/qborg/*.top salt/qborg/*.jinja)

.PHONY: all deps venv borgmatic-latest demo test unit integration functional e2e lint lab-up \
	lab-down clean dist rpm \
	matrix-deps salt-latest salt-3007 borg-1.4 test-matrix test-matrix-3007 test-matrix-3008 bench

all: test

# $(call apt_install,PACKAGES): install those of PACKAGES that are missing
define apt_install
	@missing=""; for p in $(1); do \
		dpkg-query -W -f='$${Status}' $$p 2>/dev/null | grep -q "ok installed" || missing="$$missing $$p"; \
	done; \
	if [ -n "$$missing" ]; then \
		echo "installing Debian packages:$$missing"; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing; \
	fi
endef

deps:
	$(call apt_install,$(DEB_PACKAGES))

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

# The end-to-end modules run in two labs at once (lab tags e2ea and e2eb: unix
# users, sshds and brokers of their own), each group about half the time.
E2E_GROUP_A := tests/e2e/test_attacks.py tests/e2e/test_faults.py tests/e2e/test_qborg.py \
	tests/e2e/test_highstate.py tests/e2e/test_relay.py tests/e2e/test_copies.py \
	tests/e2e/test_alerts.py tests/e2e/test_restore_to_qube.py
E2E_GROUP_B := $(filter-out $(E2E_GROUP_A),$(sort $(wildcard tests/e2e/test_*.py)))

# $(call in_two_labs,TAG A,COMMAND A,TAG B,COMMAND B): both commands at once, each
# with QBORG_LAB_TAG set (a lab of its own); their output one after the other;
# fails if either does
define in_two_labs
	@rm -f .pytest-$(1).log .pytest-$(3).log; \
	QBORG_LAB_TAG=$(1) $(2) > .pytest-$(1).log 2>&1 & a=$$!; \
	QBORG_LAB_TAG=$(3) $(4) > .pytest-$(3).log 2>&1 & b=$$!; \
	wait $$a; ra=$$?; wait $$b; rb=$$?; \
	echo "== lab $(1)"; cat .pytest-$(1).log; echo "== lab $(3)"; cat .pytest-$(3).log; \
	rm -f .pytest-$(1).log .pytest-$(3).log; \
	echo "== lab $(1): exit $$ra; lab $(3): exit $$rb"; test $$ra -eq 0 -a $$rb -eq 0
endef

TEST_ENV = QBORG_BORGMATIC_LATEST=$(BORGMATIC_LATEST)/bin/borgmatic

# The test layers (pytest.ini says what each needs; `pytest -m LAYER` selects
# one): every test runs in `make test`, lint first, then each layer, the
# quickest first.
test: lint unit integration functional e2e

lint: venv
	$(VENV)/bin/salt-lint $(SALT_FILES)
	$(VENV)/bin/yamllint --strict .
	$(VPY) -m pytest -q tests/functional/test_lint.py

# pure logic, no real tool: seconds
unit: venv
	$(VPY) -m pytest tests/unit $(PYTEST_ARGS)

# the core against real borg, borgmatic, ssh, Debian's python3 and pykeepass
integration: deps venv borgmatic-latest
	$(TEST_ENV) $(VPY) -m pytest tests/integration $(PYTEST_ARGS)

# Salt's loader; test_lint.py runs in `make lint`
functional: deps venv borgmatic-latest
	$(TEST_ENV) $(VPY) -m pytest tests/functional \
		--ignore=tests/functional/test_lint.py $(PYTEST_ARGS)

# the lab, as root: the two groups at once, each in a lab of its own
e2e: deps venv borgmatic-latest
	$(call in_two_labs,e2ea,$(TEST_ENV) $(VPY) -m pytest -p no:cacheprovider $(E2E_GROUP_A) $(PYTEST_ARGS),e2eb,$(TEST_ENV) $(VPY) -m pytest -p no:cacheprovider $(E2E_GROUP_B) $(PYTEST_ARGS))

lab-up: deps venv
	$(VPY) lab/qborg_lab.py up

lab-down: venv
	$(VPY) lab/qborg_lab.py down

clean:
	rm -rf $(VENV) .pytest_cache dist

# --- the version matrix (make test-matrix) ----------------------------------
# `make test` runs salt 3006 (the main venv), Debian 12's borg 1.2 and
# borgmatic 1.7.7, and the newest borgmatic (vm-work). `make test-matrix` runs
# the unit, integration and functional tests and the lab's core end-to-end
# tests again with salt 3007 (test-matrix-3007) and with the newest salt
# (test-matrix-3008), both with borg 1.4 on the clients and the server.
# Each lives in a venv of Debian's /usr/bin/python3 in a world-readable place,
# so the lab's qube and server users can run it.
SALT_LATEST ?= /opt/qborg-test/salt-latest
# the newest salt tested (3008.5 wants a certifi newer than PyPI serves here);
# raise it (or set SALT_LATEST_SPEC=salt) to try a newer one
SALT_LATEST_SPEC ?= salt==3008.4
# what Qubes' Fedora 42 management disposables run (Fedora 41's: 3007.1)
SALT_3007 ?= /opt/qborg-test/salt-3007
SALT_3007_SPEC ?= salt==3007.5
# salt 3007.0 to 3007.14 on PyPI declare no dependencies: these are its
# requirements (requirements/base.txt, zeromq.txt, crypto.txt)
SALT_3007_DEPS := Jinja2 jmespath msgpack PyYAML MarkupSafe requests certifi distro psutil \
	packaging looseversion tornado aiohttp croniter setproctitle timelib pyopenssl \
	python-dateutil python-gnupg cherrypy importlib-metadata zipp cryptography rpm-vercmp \
	contextvars immutables urllib3 jaraco.text jaraco.functools frozenlist pyzmq pycryptodomex
BORG14 ?= /opt/qborg-test/borg-1.4
# borg 1.4 has no wheel on PyPI: it compiles against these
BORG14_SPEC ?= borgbackup==1.4.5
MATRIX_DEB_PACKAGES := build-essential python3-dev pkg-config libacl1-dev libssl-dev \
	liblz4-dev libzstd-dev libxxhash-dev
MATRIX_PYTEST_ARGS ?=
# lint (salt-lint, yamllint) runs once, in `make test`: its findings do not
# depend on the salt version.
# the lab's core: backup, list, restore, append-only and repository isolation,
# zero changes on re-apply, the admin's batch, a VM added on its own, and the
# admin qube and a VM applied through salt-ssh (as qubesctl does)
MATRIX_E2E := tests/e2e/test_qborg.py tests/e2e/test_qborg_admin.py tests/e2e/test_salt_ssh.py
MATRIX_TESTS := tests/unit tests/integration tests/functional $(MATRIX_E2E) \
	--ignore=tests/functional/test_lint.py

matrix-deps: deps
	$(call apt_install,$(MATRIX_DEB_PACKAGES))

$(SALT_LATEST)/.installed: setup.py | deps
	install -d -m 0755 $(dir $(SALT_LATEST))
	test -x $(SALT_LATEST)/bin/python || $(PYTHON) -m venv $(SALT_LATEST)
	$(SALT_LATEST)/bin/python -m pip install -q --upgrade pip
	$(SALT_LATEST)/bin/python -m pip install -q --upgrade '$(SALT_LATEST_SPEC)' \
		paramiko passlib cryptography pyyaml 'pytest>=8' 'pytest-salt-factories>=1.0'
	touch $@

salt-latest: $(SALT_LATEST)/.installed

$(SALT_3007)/.installed: setup.py | deps
	install -d -m 0755 $(dir $(SALT_3007))
	test -x $(SALT_3007)/bin/python || $(PYTHON) -m venv $(SALT_3007)
	$(SALT_3007)/bin/python -m pip install -q --upgrade pip
	$(SALT_3007)/bin/python -m pip install -q '$(SALT_3007_SPEC)' $(SALT_3007_DEPS) \
		paramiko passlib pyyaml 'pytest>=8' 'pytest-salt-factories>=1.0'
	$(SALT_3007)/bin/salt-call --version
	touch $@

salt-3007: $(SALT_3007)/.installed

$(BORG14)/.installed: | matrix-deps
	install -d -m 0755 $(dir $(BORG14))
	test -x $(BORG14)/bin/python || /usr/bin/python3 -m venv $(BORG14)
	$(BORG14)/bin/python -m pip install -q --upgrade pip
	$(BORG14)/bin/python -m pip install -q '$(BORG14_SPEC)'
	chmod -R a+rX $(BORG14)
	$(BORG14)/bin/borg --version
	touch $@

borg-1.4: $(BORG14)/.installed

MATRIX_ENV = QBORG_BORGMATIC_LATEST=$(BORGMATIC_LATEST)/bin/borgmatic QBORG_LAB_BORG=$(BORG14)/bin/borg

# $(call matrix_run,SALT VENV): the matrix's tests with that venv's salt and borg 1.4
define matrix_run
	@echo "== salt: $$($(1)/bin/salt-call --version); borg 1.4 on clients and server: $$($(BORG14)/bin/borg --version)"
	$(MATRIX_ENV) $(1)/bin/python -m pytest $(MATRIX_TESTS) $(MATRIX_PYTEST_ARGS)
endef

test-matrix-3007: deps venv borgmatic-latest salt-3007 borg-1.4
	$(call matrix_run,$(SALT_3007))

test-matrix-3008: deps venv borgmatic-latest salt-latest borg-1.4
	$(call matrix_run,$(SALT_LATEST))

# both salts at once, each in a lab of its own (tags m3007, m3008)
test-matrix: deps venv borgmatic-latest salt-3007 salt-latest borg-1.4
	@echo "== salt $$($(SALT_3007)/bin/salt-call --version) and $$($(SALT_LATEST)/bin/salt-call --version); borg 1.4 on clients and server: $$($(BORG14)/bin/borg --version)"
	$(call in_two_labs,m3007,$(MATRIX_ENV) $(SALT_3007)/bin/python -m pytest -p no:cacheprovider $(MATRIX_TESTS) $(MATRIX_PYTEST_ARGS),m3008,$(MATRIX_ENV) $(SALT_LATEST)/bin/python -m pytest -p no:cacheprovider $(MATRIX_TESTS) $(MATRIX_PYTEST_ARGS))

# --- benchmarks (make bench; BENCH_QUICK=1 for smaller data) -----------------
# bench/run.py runs each script in bench/run.py's BENCHES in a lab of its own
# (tag `bench`) and prints one table of ratios measured in that run.
BENCH_QUICK ?=
BENCH_ARGS ?=

bench: deps venv
	BENCH_QUICK=$(BENCH_QUICK) $(VPY) bench/run.py $(BENCH_ARGS)

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
