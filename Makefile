# The README's two commands: `make run` and `make test`. Both create or reuse .venv.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
SUITE  ?= suites/ablation.yaml
BENCH_THRESHOLD ?= 20%

.PHONY: run test bench install clean

install: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -c constraints.txt -e '.[test]'
	@touch $(STAMP)

run: $(STAMP)
	$(VENV)/bin/harness run $(SUITE)

test: $(STAMP)
	$(PY) -m pytest -q -p no:cacheprovider --benchmark-disable

bench: $(STAMP)
	$(PY) -m pytest tests/perf -q --benchmark-only --benchmark-autosave \
		$(if $(wildcard .benchmarks),--benchmark-compare --benchmark-compare-fail=median:$(BENCH_THRESHOLD))

clean:
	rm -rf $(VENV) .benchmarks .pytest_cache
