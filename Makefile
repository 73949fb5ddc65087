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

# The test suite and the notebooks executed top to bottom (nbmake; outputs are not written back), in one pytest
# run over TEST_WORKERS processes (pytest-xdist: a test file runs whole on one worker, so its fixtures are built
# once; the slowest files start first: tests/conftest.py). Compiled programs are cached under .cache/jax.
TEST_WORKERS ?= 2
test: $(STAMP)
	@start=$$(date +%s); status=0; \
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder \
		--nbmake --nbmake-timeout=600 tests notebooks || status=$$?; \
	echo "make test: $$(( $$(date +%s) - start )) s of tests and notebooks on $(TEST_WORKERS) workers"; \
	exit $$status

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis .cache
