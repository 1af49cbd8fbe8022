# make lab   — set up .venv and open the course in JupyterLab
# make test  — set up .venv and run every test: unit tests, then every notebook (quick mode) under nbval,
#              then the widget notebooks in JupyterLab in a headless browser (make browser)
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: lab test unit browser pretrain pretrain-family warm clean dashboard

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	# torch 2.13.0 first: pinned, so that pip never swaps it for a different (multi-GB) build later
	$(PY) -m pip install --quiet "torch==2.13.0" || $(PY) -m pip install --quiet torch
	$(PY) -m pip install --quiet -e ".[dev]"
	touch $@

# as root (containers, cloud GPU machines) JupyterLab refuses to start without --allow-root
lab: $(VENV)/.installed
	$(VENV)/bin/jupyter lab notebooks/ $(if $(filter 0,$(shell id -u)),--allow-root)

test: $(VENV)/.installed
	MINIPEFT_QUICK=1 MINIPEFT_CACHE=0 $(PY) -m pytest -q --durations=10 --nbval-lax --ignore=tests/browser tests notebooks
	$(MAKE) --no-print-directory browser

unit: $(VENV)/.installed
	$(PY) -m pytest -q --ignore=tests/browser tests

# the widget notebooks in JupyterLab in headless Chromium (part of `make test`; skips without chromium + playwright)
browser: $(VENV)/.installed
	MINIPEFT_QUICK=1 MINIPEFT_CACHE=0 $(PY) -m pytest -q -rs tests/browser

# before a lecture: every notebook once in default mode, filling the results cache (.minipeft_cache/)
warm: $(VENV)/.installed
	$(PY) -m minipeft warm

# the lecture dashboard: the low-rank, NF4 and memory widgets in tabs, served by Voila at http://localhost:8866
dashboard: $(VENV)/.installed
	$(VENV)/bin/voila notebooks/lecture_dashboard.ipynb

pretrain: $(VENV)/.installed
	$(PY) -m minipeft pretrain

# the smaller bases of notebook 12 (data/family/), by the shipped base's recipe
pretrain-family: $(VENV)/.installed
	$(PY) -m minipeft pretrain --family

clean:
	rm -rf $(VENV)
