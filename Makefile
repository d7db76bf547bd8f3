# The two set-up commands of the README:
#   make run   - virtualenv + pinned packages, then one real prediction through predict.Predictor
#                with examples/txt2img.json: over checkpoints/ when it holds a model, else over
#                the tiny random-weight models written into $(TINY) (never into checkpoints/:
#                .dockerignore keeps $(TINY) out of the Cog image, so a tiny model can never be
#                baked in or become a deployed image's default; tests/test_deploy_files.py).
#   make test  - the same plus the test tools, then lint, type checks and the whole test suite.
PYTHON ?= python3.11
VENV ?= .venv
PY := $(VENV)/bin/python
export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false
# Keep the CPU torch: pip installs torch==2.13.0 from the machine's local CPU wheel.
PIP := $(PY) -m pip install --disable-pip-version-check -q
TINY := .tiny-models
# A real model in checkpoints/ (a file or a diffusers folder) means: run over the repository.
REAL_MODELS := $(wildcard checkpoints/*.safetensors checkpoints/*.ckpt checkpoints/*.pt checkpoints/*/model_index.json)
RUN_MODELS := $(if $(REAL_MODELS),.,$(TINY))

.PHONY: run serve test lint install models clean

$(VENV)/.installed: requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(PIP) -r requirements.txt
	touch $@

$(VENV)/.dev: $(VENV)/.installed requirements-dev.txt
	$(PIP) -r requirements-dev.txt
	$(PIP) --no-deps k-diffusion==0.1.1.post1 torchdiffeq==0.2.5 spandrel==0.3.4
	touch $@

install: $(VENV)/.installed

models: install
ifeq ($(REAL_MODELS),)
	@test -d $(TINY)/checkpoints || { echo "checkpoints/ is empty: writing the tiny random-weight models into $(TINY)/"; \
		$(PY) scripts/make_tiny_models.py $(TINY); }
endif

run: models
	SD_MODELS_DIR=$(RUN_MODELS) $(PY) scripts/run_example.py examples/txt2img.json --out output

# The webui API on http://127.0.0.1:7860 (PORT or ARGS="--port N --api-auth u:p" to change).
serve: models
	SD_MODELS_DIR=$(RUN_MODELS) $(PY) -m sdapi $(ARGS)

lint: $(VENV)/.dev
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy

test: lint
	$(PY) -m pytest -q

clean:
	rm -rf $(VENV) $(TINY) output .cache .pytest_cache .mypy_cache .ruff_cache
