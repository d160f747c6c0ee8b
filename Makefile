# Two entry points: `make demo` and `make test`. Each builds .venv itself.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test test-fast test-all install install-ocr bench clean

$(STAMP): setup.cfg
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# torch first, pinned: this build is local on the project's machines (see README)
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e ".[test]"
	touch $(STAMP)

install: $(STAMP)

# Tesseract for the `ocr` reward: the system package (as root, else through sudo) and pytesseract.
SUDO := $(if $(filter 0,$(shell id -u)),,sudo)
install-ocr: $(STAMP)
	$(SUDO) apt-get install -y tesseract-ocr
	$(BIN)/pip install -q -e ".[ocr]"

demo: $(STAMP)
	$(BIN)/python -m tpgrpo.demo --config configs/tiny.yaml

# the whole suite spread over the CPU cores (a test file stays on one worker, so its module
# fixtures are built once; tests/conftest.py); test-fast leaves out the end-to-end runs
# (subprocess fits, multi-process training, notebooks, packaging) for the edit loop
PYTEST := $(BIN)/python -m pytest -q -n auto --dist loadgroup

test: $(STAMP)
	$(PYTEST)

test-fast: $(STAMP)
	$(PYTEST) -m "not slow and not e2e"

test-all: $(STAMP)
	$(PYTEST) -m "slow or not slow"

bench: $(STAMP)
	$(BIN)/python benchmarks/rollout.py
	$(BIN)/python benchmarks/sample_efficiency.py
	$(BIN)/python benchmarks/gradient_snr.py
	$(BIN)/python benchmarks/step.py

clean:
	rm -rf $(VENV) lightning_logs outputs
