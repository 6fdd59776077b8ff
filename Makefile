# perc-daemons developer entry points.  See README.md.
PYTHON ?= /usr/bin/python3
VENV ?= .venv
PY := $(VENV)/bin/python
# trial needs the project on the path; twisted/plugins/ is found through it too.
export PYTHONPATH := $(CURDIR)

.PHONY: all venv check lint test bench demo deb clean

all: check

$(VENV)/.installed: setup.cfg pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test]'
	touch $@

venv: $(VENV)/.installed

lint: venv
	$(VENV)/bin/ruff check perc_daemons twisted tests bench

test: venv
	$(PY) -m twisted.trial $(TRIAL_FLAGS) tests

check: lint test

bench: venv
	$(PY) bench/relay.py

demo: venv
	$(PY) -m perc_daemons.demo.protocol

clean:
	rm -rf _trial_temp* build dist *.egg-info
