# The two commands: `make train` and `make test`. Both create .venv and install requirements.txt first.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: setup train test clean

$(STAMP): requirements.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements.txt
	touch $(STAMP)

setup: $(STAMP)

# The default small model on the shakespeare corpus (about 12 minutes on 2 CPU cores). Re-running resumes.
RUN_DIR ?= runs/small
train: $(STAMP)
	$(PY) -m dsv3_jax train --preset small --run-dir $(RUN_DIR)

# Unit tests, then the notebooks executed top to bottom (nbmake; outputs are not written back).
test: $(STAMP)
	$(PY) -m pytest -q tests
	$(PY) -m pytest -q --nbmake --nbmake-timeout=600 notebooks/

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis
