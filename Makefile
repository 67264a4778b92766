# The README's two commands: `make run` and `make test`. Both create or reuse .venv.
# `make docs` builds the docs site (mkdocs.yml) into site/.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
SUITE  ?= suites/ablation.yaml
BENCH_THRESHOLD ?= 20%

.PHONY: run test docs bench bench-baseline install clean

install: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -c constraints.txt -e '.[test,docs]'
	@touch $(STAMP)

run: $(STAMP)
	$(VENV)/bin/harness run $(SUITE)

test: $(STAMP)
	$(PY) -m pytest -q -p no:cacheprovider --benchmark-disable

docs: $(STAMP)
	NO_MKDOCS_2_WARNING=1 $(PY) -m mkdocs build --strict

# `make bench`: the first run saves a baseline (.benchmarks/<machine>/0001_baseline.json);
# every later run compares with that same baseline and fails when a median is more than
# BENCH_THRESHOLD slower. A failing run never replaces the baseline: after a deliberate
# change, `make bench-baseline` records a new one.
# The timer is CPU time by default: on a shared machine wall time swung by 50% between
# identical runs as other jobs took the cores; `make bench BENCH_TIMER=time.perf_counter`
# measures wall time on a quiet one (record a baseline with the same timer).
BENCH_TIMER ?= time.process_time
BENCH := $(PY) -m pytest tests/perf -q -p no:cacheprovider --benchmark-only --benchmark-storage=.benchmarks \
	--benchmark-timer=$(BENCH_TIMER)

bench: $(STAMP)
	$(if $(wildcard .benchmarks/*/*_baseline.json),\
		$(BENCH) --benchmark-compare='*_baseline' --benchmark-compare-fail=median:$(BENCH_THRESHOLD),\
		$(BENCH) --benchmark-save=baseline)

bench-baseline: $(STAMP)
	rm -f .benchmarks/*/*_baseline.json
	$(BENCH) --benchmark-save=baseline

clean:
	rm -rf $(VENV) .benchmarks .pytest_cache site
