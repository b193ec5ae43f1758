# The two commands a new machine needs: `make demo` and `make test`. Each creates .venv first.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: demo test test-fast bench-vs-hf clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP)  ## fine-tune MiniLM-L6 on Rotten Tomatoes (film-disjoint test split), print metrics
	$(VENV)/bin/tunesmith train configs/rotten_tomatoes.yaml

# two pytest workers (a test file each at a time), one torch thread each: the suite is mostly process start-up
# and tiny-model steps, which two threads do no faster than one. 2 cores: 414 s against 1,112 s for one worker
test: $(STAMP)  ## the whole suite: unit + end-to-end on tiny models + integration on real MiniLM
	$(PY) -m pytest -q -n 2 --dist loadfile

test-fast: $(STAMP)  ## everything except the integration tests
	$(PY) -m pytest -q -n 2 --dist loadfile -m "not integration"

clean:
	rm -rf $(VENV) runs .pytest_cache
