# Quick start: `make train` (set-up, data, crops, training, evaluation) and `make test`.
# Offline: make train LFW_ARCHIVE=../shared/data/lfw/lfw-deepfunneled.tgz LFW_PROTOCOL=../shared/data/lfw
PY := .venv/bin/python
LFW_ARCHIVE ?=
LFW_PROTOCOL ?=
DATA_ARGS := $(if $(LFW_ARCHIVE),--archive $(LFW_ARCHIVE)) $(if $(LFW_PROTOCOL),--protocol-dir $(LFW_PROTOCOL))

.PHONY: setup data crop train test

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

test: setup
	$(PY) -m pytest -q tests
