# Everything runs from a virtual environment in .venv/, created on first use.
VENV   := .venv
PYTHON := $(VENV)/bin/python
BIN    := $(VENV)/bin/openwb-modbus-evse
STAMP  := $(VENV)/.installed
# Debian packages the tests use as real peers: mbpoll (Modbus master), prometheus (promtool + server),
# mosquitto (MQTT broker), chromium (headless browser for the status page).
DEB_PACKAGES := mbpoll prometheus mosquitto chromium
CONFIG ?=

.PHONY: install run demo test lint format bench screenshot system-packages clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PYTHON) || python3 -m venv $(VENV)
	$(PYTHON) -m pip install --quiet --upgrade pip
	$(PYTHON) -m pip install --quiet -e '.[test,fast]'
	@$(MAKE) --no-print-directory system-packages
	touch $(STAMP)

# Installs the Debian packages when we are root on a Debian-like system; otherwise says what to do.
system-packages:
	@if command -v mbpoll >/dev/null && command -v promtool >/dev/null && command -v prometheus >/dev/null \
		&& PATH="$$PATH:/usr/sbin" command -v mosquitto >/dev/null && command -v chromium >/dev/null; then \
		: ; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $(DEB_PACKAGES); \
	else \
		echo "note: install $(DEB_PACKAGES) (e.g. sudo apt-get install $(DEB_PACKAGES)); the tests that use them are skipped until then"; \
	fi

run: install
	$(BIN) serve $(if $(CONFIG),--config $(CONFIG))

demo: install
	$(BIN) demo

test: install
	$(PYTHON) -m pytest -q

lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: install
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

bench: install
	$(PYTHON) -m tests.bench

# Renews docs/page.png and docs/page-phone.png (the README's) from the browser test.
screenshot: install
	OPENWB_SCREENSHOT=docs/page.png $(PYTHON) -m pytest -q tests/test_page.py

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache .hypothesis
