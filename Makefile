# perc-daemons developer entry points.  See README.md.
PYTHON ?= /usr/bin/python3
VENV ?= .venv
PY := $(VENV)/bin/python
# trial needs the project on the path; twisted/plugins/ is found through it too.
export PYTHONPATH := $(CURDIR)

.PHONY: all venv check lint test bench bench-cascade bench-sfu bench-rekey fuzz demo demo-protocol stack stack-down stack-status deb clean

all: check

# A fresh Debian has python3 but not its venv module: install it when we are
# root, otherwise say what to run.
$(VENV)/.installed: setup.cfg pyproject.toml
	@$(PYTHON) -c 'import ensurepip' 2>/dev/null || { \
	  if [ "$$(id -u)" = 0 ]; then apt-get update -q && \
	    apt-get install -y -q python3-venv python3-dev build-essential; \
	  else echo "perc-daemons needs python3-venv: sudo apt-get install python3-venv" >&2; \
	    exit 1; fi; }
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
	$(PY) bench/dtls_handshake.py
	$(PY) bench/conference.py --senders 2 --receivers 10 --rate 2500 --seconds 4

# One conference on one perc-md process against the same load on two cascaded
# ones (issue 12), and the cost of one hop; a few minutes, not in make check.
bench-cascade: venv
	$(PY) bench/cascade.py

# perc-md selecting (last-N, simulcast layers) against forwarding everything, 10
# participants with audio and simulcast video (issue 13); about two minutes.
bench-sfu: venv
	$(PY) bench/sfu.py

# A periodic rekey reaching a 20-endpoint conference (issue 14): from the KD's timer
# to every endpoint sending and receiving under the new epoch; about two minutes.
bench-rekey: venv
	$(PY) bench/rekey.py

# Mutation fuzzing of every sans-I/O parser (tests/fuzz): FUZZ_N inputs per
# target, FUZZ_JOBS processes; reproducing inputs go to fuzz-crashes/.  make
# check runs 10^4 per target (tests/unit/test_fuzz.py).
FUZZ_N ?= 1000000
FUZZ_JOBS ?= 2
fuzz: venv
	$(PY) -m tests.fuzz --inputs $(FUZZ_N) --jobs $(FUZZ_JOBS) --progress 600 \
	    --crash-dir fuzz-crashes

# A persistent local stack (perc-admin devstack): fixed ports, saved credentials
# (.devstack/credentials.txt), logs in .devstack/logs; it keeps running until
# make stack-down, and make stack brings the same one back.
stack: venv
	$(PY) -m perc_daemons.kmf.admin_cli devstack up --dir .devstack

stack-down: venv
	$(PY) -m perc_daemons.kmf.admin_cli devstack down --dir .devstack

stack-status: venv
	$(PY) -m perc_daemons.kmf.admin_cli devstack status --dir .devstack

# A whole conference over two cascaded MDs: KMF, md, md2 and KD as real twistd
# processes on loopback, a link md - md2, three endpoints, a leave, the end, the
# key search over both MDs; nothing is left running.
demo: venv
	$(PY) -m perc_daemons.demo.conference

# One packet through two cascaded MDs, explained byte by byte.
demo-protocol: venv
	$(PY) -m perc_daemons.demo.protocol

# The .deb: dh-virtualenv venv under /opt/venvs/perc-daemons (see debian/rules).
# dpkg-buildpackage writes its products to ..; they are moved into dist/, and
# -tc cleans debian/ afterwards so the work tree stays as it was.
DEB_VERSION = $(shell dpkg-parsechangelog -SVersion)
deb:
	env -u PYTHONPATH dpkg-buildpackage -us -uc -b -tc
	mkdir -p dist
	rm -f dist/perc-daemons_*
	mv ../perc-daemons_$(DEB_VERSION)_*.deb ../perc-daemons_$(DEB_VERSION)_*.buildinfo \
	    ../perc-daemons_$(DEB_VERSION)_*.changes dist/
	ls -l dist/*.deb

clean:
	rm -rf _trial_temp* build dist *.egg-info fuzz-crashes
