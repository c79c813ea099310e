# Two commands on a fresh machine: `make serve` runs Simili, `make test` checks it.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python

.PHONY: serve test lint services superuser clean

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

test: lint
	$(VENV)/bin/pytest

clean:
	rm -rf $(VENV) var/test
