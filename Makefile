# The two set-up commands of the README:
#   make run   - virtualenv + pinned packages, the tiny default models if checkpoints/ has none,
#                then one real prediction through predict.Predictor with examples/txt2img.json.
#   make test  - the same plus the test tools, then lint, type checks and the whole test suite.
PYTHON ?= python3.11
VENV ?= .venv
PY := $(VENV)/bin/python
export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false
# Keep the CPU torch: pip installs torch==2.13.0 from the machine's local CPU wheel.
PIP := $(PY) -m pip install --disable-pip-version-check -q

.PHONY: run test lint install models clean

$(VENV)/.installed: requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(PIP) -r requirements.txt
	$(PIP) --no-deps open-clip-torch==3.3.0
	touch $@

$(VENV)/.dev: $(VENV)/.installed requirements-dev.txt
	$(PIP) -r requirements-dev.txt
	$(PIP) --no-deps k-diffusion==0.1.1.post1 torchdiffeq==0.2.5
	touch $@

install: $(VENV)/.installed

models: install
	@if ! ls checkpoints/*.safetensors checkpoints/*.ckpt >/dev/null 2>&1; then \
		echo "checkpoints/ is empty: writing the tiny random-weight models"; \
		$(PY) scripts/make_tiny_models.py . ; \
	fi

run: models
	$(PY) scripts/run_example.py examples/txt2img.json --out output

lint: $(VENV)/.dev
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy

test: lint
	$(PY) -m pytest -q

clean:
	rm -rf $(VENV) output .cache .pytest_cache .mypy_cache .ruff_cache
