# Two commands on a fresh machine (only Python >= 3.10 and pip needed):
#   make demo   -> sets up .venv and runs the end-to-end demo on embedded synthetic data
#   make test   -> sets up .venv and runs the test suite (what .ci/run calls)
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# torch and torchvision pinned as a pair: grad-cam imports torchvision, and these two builds import together
# on CPU (a bare `torch` pulls a multi-GB CUDA build that PyPI's torchvision may not match).
TORCH_PINS ?= torch==2.14.1 torchvision==0.29.1

.PHONY: venv test demo clean

$(VENV)/.installed: setup.cfg pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade pip
	$(PY) -m pip install $(TORCH_PINS)
	$(PY) -m pip install -e ".[dev,itk,baselines,train]"
	touch $@

venv: $(VENV)/.installed

# two workers, one per core (pytest-xdist); --maxschedchunk 1 with the order set in tests/conftest.py starts the
# longest tests on different workers
test: venv
	$(PY) -m pytest -q -n 2 --maxschedchunk 1 tests

demo: venv
	$(PY) -m monai_wsss.demo --out_dir outputs/demo

clean:
	rm -rf $(VENV) outputs
