# One-command set-up, tests and demo. Everything runs inside .venv built from requirements.txt and this project.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
FMNIST_DIR ?= /usr/share/datasets/fashion-mnist
DEMO_WORKDIR ?= workdirs/demo
PYTEST_ARGS ?=
export TF_CPP_MIN_LOG_LEVEL ?= 2

.PHONY: venv data test test-slow demo results clean-venv

venv: $(VENV)/.installed

# The pinned requirements, then this project itself, editable (rd_keras, rd_keras_serving and the
# rd-keras-* commands; tests import it from there), built offline by the pinned setuptools.
$(VENV)/.installed: requirements.txt pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements.txt
	PYTHONWARNINGS=ignore $(PY) -m pip install --quiet --no-deps --no-build-isolation -e .  # setuptools 65 chatter
	touch $@

# Fashion-MNIST IDX files from Debian's dataset-fashion-mnist package (works offline from a Debian mirror).
data:
	@if [ -f $(FMNIST_DIR)/train-images-idx3-ubyte.gz ]; then \
	  echo "Fashion-MNIST found in $(FMNIST_DIR)"; \
	elif command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ]; then \
	  (apt-get install -y -qq dataset-fashion-mnist || (apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist)) >/dev/null; \
	else \
	  echo "Fashion-MNIST missing: run 'sudo apt-get install dataset-fashion-mnist' or set FMNIST_DIR"; exit 1; \
	fi

test: venv data
	$(PY) -m pytest -m "not slow" $(PYTEST_ARGS)

test-slow: venv data
	$(PY) -m pytest -m slow $(PYTEST_ARGS)

# The directory `data` checked is the one the run reads. Rerunning a finished demo resumes nothing, and its
# export writes no new SavedModel version of the same weights.
demo: venv data
	$(PY) train.py --config=configs/fashion_mnist.py:demo --workdir=$(DEMO_WORKDIR) \
	  --config.data.data_dir="$(FMNIST_DIR)"

results: venv data
	$(PY) -m rd_keras.bench report

clean-venv:
	rm -rf $(VENV)
