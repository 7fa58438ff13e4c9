# Two commands do all the set-up on a fresh machine:  `make demo`  and  `make test`.
# Both create .venv on first use (torch pinned first: see DESIGN.md §6) and install Java for METEOR.

PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
SEED   ?= 0
OUT    ?= runs/demo
STAMP  := $(VENV)/.installed

.PHONY: demo test lint venv clean

$(STAMP): setup.py constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -c constraints.txt -e ".[dev,demo]"
	@command -v java >/dev/null 2>&1 || (apt-get update -qq && apt-get install -y -qq default-jre-headless) \
	  || echo "warning: Java not installed; METEOR will be skipped"
	touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/dst-train make-demo-data --out $(OUT)/data --seed $(SEED)
	$(VENV)/bin/dst-train validate-data $(OUT)/data

test: $(STAMP)
	$(VENV)/bin/ruff check .
	$(PY) -m pytest -q tests

lint: $(STAMP)
	$(VENV)/bin/ruff check .

clean:
	rm -rf $(VENV) runs
