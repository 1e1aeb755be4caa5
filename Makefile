# Two commands do everything on a fresh Debian machine with Python 3.11:
#   make quickstart   set up, fetch the embedded dataset if missing, train
#   make test         set up and run the whole test suite
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
WORKDIR ?= workdirs/quickstart
FASHION_MNIST_DIR ?= /usr/share/datasets/fashion-mnist
PYTEST_WORKERS ?= 2

.PHONY: install test test-fast quickstart fashion-mnist clean

install: $(STAMP)

# Re-installs only when the package metadata changes, so `make test` is idempotent.
$(STAMP): setup.cfg pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $(STAMP)

test: $(STAMP)
	$(BIN)/python -m pytest -n $(PYTEST_WORKERS) tests

# The edit-test loop: everything but the end-to-end runs marked slow.
test-fast: $(STAMP)
	$(BIN)/python -m pytest -n $(PYTEST_WORKERS) -m 'not slow' tests

fashion-mnist:
	@if [ ! -f $(FASHION_MNIST_DIR)/train-images-idx3-ubyte.gz ]; then \
	  echo "Installing Debian package dataset-fashion-mnist"; \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get install -y dataset-fashion-mnist || \
	    { $$SUDO apt-get update && $$SUDO apt-get install -y dataset-fashion-mnist; }; \
	fi

quickstart: $(STAMP) fashion-mnist
	$(BIN)/python -m vgg_jax.main --config=configs/quickstart.py --workdir=$(WORKDIR)

clean:
	rm -rf $(VENV) build *.egg-info
