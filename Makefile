# Two commands do all the set-up on a fresh machine:  `make demo`  and  `make test`.
# Both create .venv on first use (torch pinned first: see DESIGN.md §6) and install Java for METEOR.

PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
SEED   ?= 0
OUT    ?= runs/demo
VIDEOS ?= 400
HELDOUT ?= 20
PORT   ?= 29531
STAMP  := $(VENV)/.installed

.PHONY: demo test lint venv clean gpu-bench gpu-wheels mutation docs

$(STAMP): setup.py constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -c constraints.txt -e ".[dev,demo]"
	@command -v java >/dev/null 2>&1 || (apt-get update -qq && apt-get install -y -qq default-jre-headless) \
	  || echo "warning: Java not installed; METEOR will be skipped"
	touch $(STAMP)

venv: $(STAMP)

# The main job: data -> tiny SmolVLM -> DeepSpeed ZeRO-2 training in 2 processes (gloo on CPU,
# GPUs when present) -> Hugging Face folder -> evaluation against the untrained baseline.
demo: $(STAMP)
	$(VENV)/bin/dst-train make-demo-data --out $(OUT)/data --seed $(SEED) --videos $(VIDEOS) \
	  --held-out $(HELDOUT)
	$(VENV)/bin/dst-train validate-data $(OUT)/data
	$(VENV)/bin/dst-train make-tiny-model --data $(OUT)/data --out $(OUT)/tiny-model --seed $(SEED) \
	  --hidden 128 --layers 4
	$(VENV)/bin/deepspeed --num_gpus 2 --master_port $(PORT) --module dst_train.cli train \
	  --config launch/configs/demo.yaml data.root=$(OUT)/data model.arch=$(OUT)/tiny-model \
	  output_dir=$(OUT) seed=$(SEED)
	$(VENV)/bin/dst-train convert $(OUT)/checkpoints $(OUT)/hf
	$(VENV)/bin/dst-train evaluate $(OUT)/hf --data $(OUT)/data --out $(OUT)/eval --baseline \
	  --baseline-clips 2
	@echo "demo done: data $(OUT)/data | checkpoints $(OUT)/checkpoints | model $(OUT)/hf |" \
	  "metrics $(OUT)/metrics.jsonl, $(OUT)/loss_curve.png | evaluation $(OUT)/eval/report.md"

test: $(STAMP)
	$(VENV)/bin/ruff check .
	$(PY) -m pytest -q tests

# Every GPU claim in one command (benchmarks/gpu_bench.py): SmolVLM2-2.2B with random weights,
# offline, under an emulated 24 GB card; results in benchmarks/results/gpu_*.json.
# DRY_RUN=1: the same stages on CPU with the tiny model (tests/test_benchmarks.py runs it).
gpu-bench: $(STAMP)
	$(PY) benchmarks/gpu_bench.py $(if $(DRY_RUN),--dry-run) $(GPU_BENCH_ARGS)

# What a lent GPU machine's image lacks (it reaches no registry): CPython 3.12 wheels into .whl/
# (git-ignored), which the device tool carries; benchmarks/gpu_lease.sh installs them there.
# DeepSpeed is published as a source archive only: its wheel (pure Python) is built here, against
# this venv's torch.
GPU_WHEELS ?= transformers==5.23.0 peft==0.21.2 datasets==5.2.0 hjson==3.1.0 \
  pydantic==2.14.4 pydantic_core==2.50.5 annotated_types==0.8.0 typing_inspection==0.4.5 \
  typing_extensions==4.16.0 dill==0.4.1 multiprocess==0.70.19
GPU_SOURCE_WHEELS ?= deepspeed==0.19.8
gpu-wheels: $(STAMP)
	$(PY) -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
	  --abi cp312 --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 \
	  --platform manylinux_2_28_x86_64 -d .whl $(GPU_WHEELS)
	$(PY) -m pip wheel -q --no-deps --no-build-isolation -w .whl $(GPU_SOURCE_WHEELS)

# Mutation testing (tools/mutation.py; not part of `make test`): a coverage pass of the suite, then
# a seeded sample of mutants per package, each against the tests that run its line. ~1-2 h on 2 cores.
mutation: $(STAMP)
	$(PY) -m pip install -q -c constraints.txt coverage
	$(PY) tools/mutation.py $(MUTATION_ARGS)

# docs/configuration.md: every run option, written from dst_train/config.py (a test keeps them equal)
docs: $(STAMP)
	$(PY) -c "from dst_train.config import reference; print(reference(), end='')" > docs/configuration.md

lint: $(STAMP)
	$(VENV)/bin/ruff check .

clean:
	rm -rf $(VENV) runs
