# Each target sets itself up from nothing but Python: the venv and the installs are made on first use.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
CHECKPOINT ?=
PROMPT ?= What is the capital of France?
PYTEST_ARGS ?=

.PHONY: demo test parity golden clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install -q -e .
	touch $@

$(VENV)/.installed-test: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install -q -e ".[test]"
	touch $@

# The references: torch (CPU), transformers, and OpenAI's gpt-oss, whose wheel declares Python >= 3.12 although
# its torch code runs on 3.11, hence --ignore-requires-python (and --no-deps: its other needs are for serving).
$(VENV)/.installed-reference: pyproject.toml $(VENV)/.installed-test
	$(BIN)/python -m pip install -q -e ".[test,reference]"
	$(BIN)/python -m pip download -q --no-deps --python-version 3.12 --only-binary :all: -d $(VENV)/wheels gpt-oss==0.0.9
	$(BIN)/python -m pip install -q --no-deps --ignore-requires-python $(VENV)/wheels/gpt_oss-0.0.9-py3-none-any.whl
	touch $@

# A Harmony chat reply to PROMPT, streamed; makes a tiny random checkpoint unless CHECKPOINT=DIR is given.
demo: $(VENV)/.installed
ifeq ($(CHECKPOINT),)
	@test -f demo-checkpoint/config.json || $(BIN)/gptoss-jax init --preset tiny --out demo-checkpoint
	$(BIN)/gptoss-jax generate --checkpoint demo-checkpoint --prompt "$(PROMPT)" --max-new-tokens 32
else
	$(BIN)/gptoss-jax generate --checkpoint "$(CHECKPOINT)" --prompt "$(PROMPT)" --max-new-tokens 256
endif

# The default tier: unit tests, the tiny model end to end, golden parity fixtures (no torch needed).
# One worker per core, whole files per worker (module fixtures compile once); the slowest tests are listed.
test: $(VENV)/.installed-test
	$(BIN)/pytest -n auto --dist loadfile --durations=15 $(PYTEST_ARGS)

# The parity tier: live comparison against transformers and gpt_oss.torch; a missing reference fails.
parity: $(VENV)/.installed-reference
	GPTOSS_REQUIRE_REFERENCES=1 $(BIN)/pytest -m parity $(PYTEST_ARGS)

# Rebuild the committed golden fixtures from the references.
golden: $(VENV)/.installed-reference
	$(BIN)/python tests/make_golden.py

# Every benchmark and the evaluations, one report: experiments/results/REPORT.md (minutes to hours on a CPU).
# BENCH_ARGS="--quick" for a smoke run (experiments/results/quick), "--only evals", "--no-transformers";
# CHECKPOINT=DIR evaluates that model (default: a random tiny checkpoint).
.PHONY: bench
bench: $(VENV)/.installed-test
	$(BIN)/python -m pip install -q -e ".[test,bench]"
	nice -n 19 $(BIN)/python experiments/bench_all.py $(if $(CHECKPOINT),--checkpoint "$(CHECKPOINT)") $(BENCH_ARGS)

clean:
	rm -rf $(VENV) demo-checkpoint .pytest_cache
