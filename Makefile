# Each target sets itself up from nothing but Python: the venv and the installs are made on first use.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
CHECKPOINT ?=
PROMPT ?= What is 48 + 79?
PYTEST_ARGS ?=

.PHONY: demo demo-model test mesh e2e accel strip-notebooks parity golden clean

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

# A Harmony chat reply to PROMPT, streamed, from the committed demo model (demo/gptoss-demo, which adds
# integers: its reasoning shows the column-by-column working) unless CHECKPOINT=DIR is given.
demo: $(VENV)/.installed
	$(BIN)/gptoss-jax generate $(if $(CHECKPOINT),--checkpoint "$(CHECKPOINT)") --prompt "$(PROMPT)" --temperature 0 --max-new-tokens 256

# Rebuild demo/gptoss-demo from nothing with the committed recipe (gptoss_jax/demo.py): the data, the untrained
# model, `gptoss-jax finetune`, the MXFP4 export, and the held-out evaluation written to demo/eval.json. The
# committed model is a 600-step run extended to 2,400 steps (a run's --steps may grow when it resumes: the cosine
# schedule restarts toward the new end); the two finetune commands reproduce exactly that. About 90 minutes on 2
# CPU cores; resumable: run it again after an interruption.
DEMO_BUILD ?= demo/build
DEMO_FINETUNE = $(BIN)/gptoss-jax finetune --checkpoint $(DEMO_BUILD)/init --data $(DEMO_BUILD)/data/train.jsonl \
	--eval-data $(DEMO_BUILD)/data/eval.jsonl --out $(DEMO_BUILD)/run --compact-vocab --batch-size 8 --seq-len 512 \
	--lr 3e-3 --warmup 30 --dtype float32 --remat none --save-every 100 --eval-every 100 --keep 3
demo-model: $(VENV)/.installed
	test -f $(DEMO_BUILD)/data/train.jsonl || $(BIN)/python -m gptoss_jax.demo data --out $(DEMO_BUILD)/data
	test -f $(DEMO_BUILD)/init/config.json || $(BIN)/python -m gptoss_jax.demo init --data $(DEMO_BUILD)/data --out $(DEMO_BUILD)/init
	$(DEMO_FINETUNE) --steps 600
	$(DEMO_FINETUNE) --steps 2400
	$(BIN)/gptoss-jax convert --checkpoint $(DEMO_BUILD)/run --out demo/gptoss-demo --format original --overwrite
	$(BIN)/python -m gptoss_jax.demo eval --checkpoint demo/gptoss-demo --out demo/eval.json

# The default tier: unit tests, the tiny model end to end, golden parity fixtures (no torch needed); runs on
# several devices are the mesh tier below; shared fixtures in tests/conftest.py. One worker per core, whole
# files per worker (module fixtures compile once), the slowest files first (tests/conftest.py SLOW_FILES); XLA's
# compiles are kept in .pytest_cache/d/jax-cache and shared by the workers, their subprocesses and later runs
# (tests/conftest.py); the slowest tests are listed.
test: $(VENV)/.installed-test
	$(BIN)/pytest -n auto --dist loadfile --no-loadscope-reorder --durations=15 $(PYTEST_ARGS)

# The mesh tier (CI runs it): tests/mesh/, every sharded run in a subprocess with 8 simulated CPU devices (the
# model, the training step, the CLI's commands on meshes) and two loopback processes joined by jax.distributed.
mesh: $(VENV)/.installed-test
	$(BIN)/pytest -n auto --dist loadfile -m "mesh and not slow" --durations=0 $(PYTEST_ARGS) tests/mesh

# End to end on the committed demo model (CI runs this too): every notebook in notebooks/, executed top to bottom
# in its own Jupyter kernel; the demo model's accuracy and tool calls; the evaluation harness at smoke size.
e2e: $(VENV)/.installed-notebooks
	$(BIN)/pytest -n auto -m "notebooks or demo" --durations=0 $(PYTEST_ARGS)

$(VENV)/.installed-notebooks: pyproject.toml $(VENV)/.installed-test
	$(BIN)/python -m pip install -q -e ".[test,notebooks]"
	touch $@

# The accelerator tier (CI runs it): every Pallas kernel and the model's real steps compiled for TPU (libtpu) and
# GPU (the CUDA plugin) on this CPU host, deviceless, with the compilers' per-device memory checked.
# Its own venv: with libtpu and the CUDA plugin installed, JAX would look for a TPU and a GPU at every start.
ACCEL_VENV ?= .venv-accel
accel: $(ACCEL_VENV)/.installed
	$(ACCEL_VENV)/bin/pytest -n auto -m accel --durations=0 $(PYTEST_ARGS) tests/accel

$(ACCEL_VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(ACCEL_VENV)
	$(ACCEL_VENV)/bin/python -m pip install -q --upgrade pip
	$(ACCEL_VENV)/bin/python -m pip install -q -e ".[test,tpu,gpu]"
	touch $@

# Clear every notebook's outputs before committing (the test suite checks they are clear).
strip-notebooks: $(VENV)/.installed-notebooks
	$(BIN)/python -c "import sys, nbformat; [nbformat.write(nb, p) for p in sys.argv[1:] for nb in [nbformat.read(p, 4)] for c in nb.cells if c.cell_type == 'code' and not c.update(outputs=[], execution_count=None)]" notebooks/*.ipynb

# The parity tier: live comparison against transformers and gpt_oss.torch; a missing reference fails.
parity: $(VENV)/.installed-reference
	GPTOSS_REQUIRE_REFERENCES=1 $(BIN)/pytest -m parity $(PYTEST_ARGS)

# Rebuild the committed golden fixtures from the references.
golden: $(VENV)/.installed-reference
	$(BIN)/python tests/make_golden.py

# Every benchmark and the evaluations, one report: experiments/results/REPORT.md (minutes to hours on a CPU).
# BENCH_ARGS="--quick" for a smoke run (experiments/results/quick), "--only evals", "--no-transformers";
# CHECKPOINT=DIR evaluates that model (default: the demo model).
.PHONY: bench
bench: $(VENV)/.installed-test
	$(BIN)/python -m pip install -q -e ".[test,bench]"
	nice -n 19 $(BIN)/python experiments/bench_all.py $(if $(CHECKPOINT),--checkpoint "$(CHECKPOINT)") $(BENCH_ARGS)

clean:
	rm -rf $(VENV) $(ACCEL_VENV) $(DEMO_BUILD) .pytest_cache
