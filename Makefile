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

test: $(STAMP)  ## the whole suite: unit + end-to-end on tiny models + integration on real MiniLM
	$(PY) -m pytest -q

test-fast: $(STAMP)  ## everything except the integration tests
	$(PY) -m pytest -q -m "not integration"

clean:
	rm -rf $(VENV) runs .pytest_cache
