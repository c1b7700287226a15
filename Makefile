# The two commands a fresh machine needs: `make demo` and `make test`. Both create .venv if missing
# and install stepjax with its pinned constraints first.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test notebooks drills bench lock clean

$(STAMP): setup.py constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -c constraints.txt -e '.[test,experiments,notebooks]'
	touch $(STAMP)

# The main job: one SFT warm start, then StepPO (GSPO and exact step ratio), token-level PPO (lambda 1 and 0.95) and
# GRPO, 5 seeds each, on the embedded default environment (2-hop lookup_qa, think-format steps) with an expert that
# stops early; prints the held-out results table and writes runs/demo/results.md (with the paired comparison against
# StepPO and the training diagnostics) and curves.png.
demo: $(STAMP)
	$(PY) experiments/ablation.py --name=demo --methods=steppo,steppo_exact,token_ppo,token_ppo_lam95,grpo --seeds=5 \
	    --regime=two_hop_skip

# Two workers (one per core); whole files per worker so each file's compiled functions are reused.
# --durations lists the slowest tests: the suite has a 10-minute budget on 2 cores. tests/conftest.py
# gives every run 8 fake CPU devices for the mesh tests.
test: $(STAMP)
	$(PY) -m pytest -n 2 --dist loadfile -m 'not drill' --durations=15 tests

# Executes every notebook in notebooks/ at its CI size (STEPJAX_NOTEBOOK_SIZE=ci) and checks each .ipynb against its
# jupytext .py source and its committed plots; not part of `make test` (that suite has its own time budget).
notebooks: $(STAMP)
	$(PY) -m pytest -n 2 notebooks/test_notebooks.py

# The reliability drills at their full counts (the suite runs small counts of each): kill/resume, poison, corrupt
# inputs, disk full, fuzzing every JAX env, crashing and hanging host envs in worker processes. Each prints its figure.
drills: $(STAMP)
	$(PY) -m pytest -n 2 --dist loadfile -m drill tests
	$(PY) -m drills.kill --kills 20
	$(PY) -m drills.poison
	$(PY) -m drills.corrupt
	$(PY) -m drills.disk
	$(PY) -m drills.fuzz --sequences 10000
	$(PY) -m drills.host_isolation

bench: $(STAMP)
	$(PY) -m benchmarks.credit
	$(PY) -m benchmarks.generate
	$(PY) -m benchmarks.rollout
	$(PY) -m benchmarks.train
	$(PY) -m benchmarks.iteration_parts
	$(PY) -m benchmarks.attention
	$(PY) -m benchmarks.host_train
	$(PY) -m benchmarks.host_envs --search-qa

# Re-pin constraints.txt from what is installed in .venv.
lock: $(STAMP)
	( echo "# Pinned versions known to install and pass the suite on CPU with Python 3.11 (pip constraints file)."; \
	  echo "# Regenerate: make lock (after changing setup.py)."; \
	  $(PY) -m pip freeze | grep -v '^-e' | sed 's/+cpu$$//' | sort -f ) > constraints.txt

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
