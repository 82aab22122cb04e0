# Quick start: `make train` (set-up, data, crops, training, evaluation) and `make test`.
# Offline: make train LFW_ARCHIVE=../shared/data/lfw/lfw-deepfunneled.tgz LFW_PROTOCOL=../shared/data/lfw
PY := .venv/bin/python
LFW_ARCHIVE ?=
LFW_PROTOCOL ?=
# trainer2.py overrides for `make train`, e.g. TRAIN_ARGS="--max_minutes=5"
TRAIN_ARGS ?=
DATA_ARGS := $(if $(LFW_ARCHIVE),--archive $(LFW_ARCHIVE)) $(if $(LFW_PROTOCOL),--protocol-dir $(LFW_PROTOCOL))
# `make train` names its run, so that it evaluates that run and no other.
TRAIN_RUN := train-$(shell date +%Y%m%d-%H%M%S)
# The newest run under logs/, for `make evaluate`.
RUN ?= $(shell ls -td logs/*/ 2>/dev/null | head -1)

.PHONY: setup data crop train evaluate test app e2e bench

setup: .venv/.installed

.venv/.installed: requirements.txt
	python3 -m venv .venv
	.venv/bin/pip install -q -r requirements.txt
	touch $@

data: setup
	$(PY) download_data.py $(DATA_ARGS)

crop: data
	$(PY) crop_dataset_to_faces.py

train: crop
	$(PY) trainer2.py --run_name=$(TRAIN_RUN) $(TRAIN_ARGS)
	$(MAKE) evaluate RUN=logs/$(TRAIN_RUN)/

# View 1 (DevTest pairs, people unseen in training), then the 6,000 View 2 pairs. A View 1
# model has seen many View 2 people, which evaluate.py reports as contamination: the honest
# View 2 figure trains a model per fold (python benchmark.py --protocol view2).
evaluate: setup
	@test -n "$(RUN)" || { echo "error: no run under logs/; train one with 'make train'" >&2; exit 1; }
	$(PY) evaluate.py $(RUN)best_accuracy.pt --pairs dataset/pairsDevTest.txt --flip
	$(PY) evaluate.py $(RUN)best_accuracy.pt --pairs dataset/pairs.txt --flip

test: setup
	$(PY) -m pytest -q tests

app: setup
	$(PY) -m streamlit run app.py

# Browser test: Debian's Chromium and its driver, Selenium, then the test (screenshot in /tmp).
e2e: setup
	command -v chromium >/dev/null && command -v chromedriver >/dev/null || \
		(apt-get update -q && apt-get install -y -q chromium chromium-driver)
	.venv/bin/pip install -q -r requirements-e2e.txt
	E2E_SCREENSHOT=$${E2E_SCREENSHOT:-/tmp/e2e_screenshot.png} $(PY) -m pytest -q tests/e2e

# The results table: about two hours on 2 CPU cores (run it in the background).
bench: setup
	$(PY) benchmark.py --lfw ../shared/data/lfw --protocol all
