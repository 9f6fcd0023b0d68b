# Everything runs from a virtual environment in .venv/, created on first use.
# `make install` installs the service only; `make test` (and lint, bench) adds the test tools
# and the Debian programs the tests run as real peers.
VENV    := .venv
PYTHON  := $(VENV)/bin/python
BIN     := $(VENV)/bin/openwb-modbus-evse
STAMP   := $(VENV)/.installed
TESTED  := $(VENV)/.installed-test
# The interpreter the venv is made with. For a system service use the system's:
# `sudo make install PYTHON3=/usr/bin/python3` (see README, Running it as a service).
PYTHON3 ?= python3
# Debian packages the tests use as real peers: mbpoll (Modbus master), prometheus (promtool + server),
# mosquitto (MQTT broker), chromium (headless browser for the status page).
DEB_PACKAGES := mbpoll prometheus mosquitto chromium
CONFIG ?=

.PHONY: install install-test ha-venv run demo test lint format docs bench screenshot system-packages clean

install: $(STAMP)

$(PYTHON):
	@command -v $(PYTHON3) >/dev/null || { \
		echo "error: $(PYTHON3) not found. On Debian/Ubuntu: sudo apt-get install python3 python3-venv"; exit 1; }
	@$(PYTHON3) -c 'import sys; sys.exit(sys.version_info < (3, 11))' || { \
		echo "error: Python >= 3.11 is needed, $(PYTHON3) is $$($(PYTHON3) -V 2>&1)"; exit 1; }
	@$(PYTHON3) -c 'import venv, ensurepip' 2>/dev/null || { \
		echo "error: $(PYTHON3) cannot make a virtual environment. On Debian/Ubuntu: sudo apt-get install python3-venv"; exit 1; }
	$(PYTHON3) -m venv $(VENV)

# The service and what it runs with, nothing else.
$(STAMP): pyproject.toml | $(PYTHON)
	$(PYTHON) -m pip install --quiet --upgrade pip
	$(PYTHON) -m pip install --quiet -e '.[fast]'
	touch $(STAMP)

install-test: $(TESTED)

$(TESTED): $(STAMP)
	$(PYTHON) -m pip install --quiet -e '.[test,fast]'
	@$(MAKE) --no-print-directory system-packages
	touch $(TESTED)

# Installs the Debian packages when we are root on a Debian-like system, without starting or
# enabling their services; otherwise says what to do.
system-packages:
	@if command -v mbpoll >/dev/null && command -v promtool >/dev/null && command -v prometheus >/dev/null \
		&& PATH="$$PATH:/usr/sbin" command -v mosquitto >/dev/null && command -v chromium >/dev/null; then \
		: ; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		sh tools/apt-install-no-services $(DEB_PACKAGES); \
	else \
		echo "note: install $(DEB_PACKAGES) (e.g. sudo apt-get install $(DEB_PACKAGES)); the tests that use them are skipped until then"; \
	fi

run: install
	$(BIN) serve $(if $(CONFIG),--config $(CONFIG))

demo: install
	$(BIN) demo $(DEMO_OPTIONS)

# Most tests wait on sockets, timers and subprocesses rather than the CPU: four workers cut the
# run from ~3 min to ~1 min even on two cores.
test: install-test ha-venv
	$(PYTHON) -m pytest -q -n 4

# Home Assistant's own MQTT discovery schemas check what the service announces (tests only, never
# needed to run the service). Home Assistant needs Python >= 3.13 (HA_PYTHON3); without one the
# test that uses it is skipped (and fails on CI, where every tool must be there).
HA_VENV    := .venv-ha
# The first Python >= 3.13 on PATH or among pyenv's versions.
HA_PYTHON3 ?= $(shell for p in python3.14 python3.13 $$(ls -d $${PYENV_ROOT:-$$HOME/.pyenv}/versions/3.1[3-9]*/bin/python3 2>/dev/null); do \
	$$p -c 'import sys; sys.exit(sys.version_info < (3, 13))' 2>/dev/null && { echo $$p; break; }; done)
HA_STAMP   := $(HA_VENV)/.installed

ha-venv: $(HA_STAMP)

$(HA_STAMP): tests/requirements-ha.txt
	@if [ -n "$(HA_PYTHON3)" ] && $(HA_PYTHON3) -c 'import sys; sys.exit(sys.version_info < (3, 13))' 2>/dev/null; then \
		$(HA_PYTHON3) -m venv $(HA_VENV) \
		&& $(HA_VENV)/bin/python -m pip install --quiet --disable-pip-version-check -r tests/requirements-ha.txt \
		&& touch $@; \
	else \
		echo "note: no Python >= 3.13 found (HA_PYTHON3): the Home Assistant schema test is skipped"; \
	fi

lint: install-test
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: install-test
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

# Renews docs/configuration.md from the settings table in openwb_modbus_evse/config.py (a test
# fails while the committed file differs).
docs: install
	$(BIN) config-reference > docs/configuration.md

# The bench's load generator and reference server are C programs on libmodbus (Debian
# libmodbus-dev), so that the load generator is not what limits the measured rates.
BENCH_BIN := $(VENV)/bin/bench_client $(VENV)/bin/bench_server

bench: install-test $(BENCH_BIN)
	$(PYTHON) -m bench

$(VENV)/bin/bench_%: bench/bench_%.c | $(PYTHON)
	@test -f /usr/include/modbus/modbus.h || { echo "make bench needs libmodbus-dev for its C load generator: sudo apt-get install libmodbus-dev"; exit 1; }
	cc -O2 -Wall -Wextra -I/usr/include/modbus -o $@ $< -lmodbus -lpthread

# Renews docs/page.png and docs/page-phone.png (the README's) from the browser test.
screenshot: install-test
	OPENWB_SCREENSHOT=docs/page.png $(PYTHON) -m pytest -q tests/test_cockpit.py -k screenshots

clean:
	rm -rf $(VENV) $(HA_VENV) .pytest_cache .ruff_cache .hypothesis
