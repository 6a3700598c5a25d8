# p2pupd — the two commands a new machine needs: `make demo` and `make test`.
PYTHON ?= python3
VENV   ?= .venv
# Test processes (pytest-xdist). Most of the suite's time is daemons, network
# namespaces and SIGKILLed children waiting on one another, not CPU: three
# workers on a 2-core machine take the suite from ~10 to ~7 minutes.
TEST_WORKERS ?= 3
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: demo test fuzz lint typecheck check bench clean dist dist-lock

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[test]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/p2pupd demo

test: $(STAMP)
	$(MAKE) --no-print-directory lint typecheck
	$(BIN)/python -m pytest -q -p no:cacheprovider -n $(TEST_WORKERS) tests

# Every decoder that sees unverified bytes, fuzzed FUZZ_SCALE times longer than
# in `make test` (tests/property/_fuzz.py: typed errors only, memory and time
# within each input's budget). FUZZ_SCALE=200 runs for roughly half an hour.
FUZZ_SCALE ?= 200
fuzz: $(STAMP)
	P2PUPD_FUZZ_SCALE=$(FUZZ_SCALE) $(BIN)/python -m pytest -q -p no:cacheprovider \
		tests/property/test_decoder_fuzz.py tests/property/test_wire_fuzz.py \
		tests/property/test_site_fuzz.py

lint: $(STAMP)
	$(BIN)/ruff check protocol daemon tools tests installer

# mypy checks the packages under their import names through a symlink farm,
# since the folders are mapped (protocol/ -> p2pupd.protocol, ...).
typecheck: $(STAMP)
	rm -rf build/typecheck && mkdir -p build/typecheck/p2pupd
	ln -s ../../../protocol build/typecheck/p2pupd/protocol
	ln -s ../../../daemon build/typecheck/p2pupd/daemon
	ln -s ../../../tools build/typecheck/p2pupd/tools
	cd build/typecheck && ../../$(BIN)/mypy --config-file ../../pyproject.toml -p p2pupd.protocol -p p2pupd.daemon -p p2pupd.tools
	$(BIN)/mypy --config-file pyproject.toml installer/build.py
	cd installer/onbox && ../../$(BIN)/mypy --config-file ../../pyproject.toml --cache-dir ../../.mypy_cache *.py

bench: $(STAMP)
	$(BIN)/python -m p2pupd.tools.bench $(BENCH)

# The offline installer artifacts, one per CPU: dist/p2pupd-VERSION-linux-ARCH.tar.gz
# (see docs/install.md). Uses the package index; the artifacts install without it.
# DIST_ARGS narrows it, e.g. DIST_ARGS="--arch x86_64 --python 3.11".
dist: $(STAMP)
	$(BIN)/python installer/build.py dist $(DIST_ARGS)

# Re-pin the dependency versions the artifacts carry (installer/constraints.txt).
dist-lock: $(STAMP)
	$(BIN)/python installer/build.py lock

clean:
	rm -rf $(VENV) build dist *.egg-info .mypy_cache .ruff_cache
