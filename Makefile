# Two commands on a fresh machine: `make serve` runs Simili, `make test` checks it.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python

.PHONY: serve test lint browser services superuser clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $@

serve: $(VENV)/.installed
	$(PY) manage.py serve

services: $(VENV)/.installed
	$(PY) manage.py services

superuser: $(VENV)/.installed
	$(PY) manage.py createsuperuser

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy

# Browser tests drive Debian's Chromium; install it when missing and we may (root, apt).
browser:
	@if [ ! -x /usr/bin/chromium ]; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium; \
	  else echo "note: /usr/bin/chromium is missing; browser tests will be skipped (apt-get install chromium)"; fi; \
	fi

test: lint browser
	$(VENV)/bin/pytest

clean:
	rm -rf $(VENV) var/test
