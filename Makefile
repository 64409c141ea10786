# orbit: make install | demo | test | bench | lint
PYTHON ?= python3.11
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
# The torch build this project is tested with (served from local disk on our machines).
TORCH_SPEC ?= torch==2.14.1 torchvision==0.29.1
RUN    ?= runs/demo
# The tests read the real Fashion-MNIST files of Debian's dataset-fashion-mnist package.
FASHION_MNIST := /usr/share/datasets/fashion-mnist
SUDO   := $(shell [ "$$(id -u)" -eq 0 ] || echo sudo)

.PHONY: install demo test bench lint format clean fashion-mnist

$(VENV)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	$(PIP) install --quiet $(TORCH_SPEC)
	$(PIP) install --quiet -c constraints.txt -e '.[all]'
	$(PIP) check
	touch $@

install: $(VENV)/.installed

demo: install
	$(VENV)/bin/orbit run --run $(RUN) --overwrite

fashion-mnist:
	@test -d $(FASHION_MNIST) || { command -v apt-get >/dev/null \
	  && $(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq dataset-fashion-mnist; } \
	  || { echo "make test needs $(FASHION_MNIST): apt-get install dataset-fashion-mnist"; exit 1; }

test: install fashion-mnist
	$(PY) -m pytest -q

bench: install
	$(PY) benchmarks/run_all.py

lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: install
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

clean:
	rm -rf $(VENV) runs .pytest_cache .ruff_cache
