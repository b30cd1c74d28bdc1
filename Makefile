# Two commands set everything up on a fresh machine: `make demo` and `make test`.
# The venv is created if missing; pip installs with constraints.txt, which pins the torch /
# torchvision pair that lies on this machine's local disk (no multi-GB download).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.medkt-installed
# one CPU thread for tests: on a shared 2-core machine two threads made tiny models 100-300x slower
TEST_ENV := OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 MEDKT_REQUIRE_MEDCLIP=1
DEMO_OUT ?= runs/demo-$(shell date +%Y%m%d-%H%M%S)

.PHONY: install test demo bench docs clean

# upstream MedCLIP is installed for its oracle test only: --no-deps skips textaugment/gensim/
# googletrans and a PyPI "asyncio" package; its model code needs just the medclip-oracle extra.
$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check -c constraints.txt -e ".[test,captioning,medclip-oracle]"
	$(PY) -m pip install -q --disable-pip-version-check -c constraints.txt --no-deps medclip==0.0.3
	touch $(STAMP)

install: $(STAMP)

test: install
	$(TEST_ENV) $(PY) -m pytest -q

demo: install
	OMP_NUM_THREADS=1 $(VENV)/bin/medkt transfer --bundle phantom_nodules --output $(DEMO_OUT)

# API reference from the docstrings into site/; --strict: a broken reference or a docstring griffe
# cannot parse fails the build (tests/test_docstrings.py checks every public name has one)
DOCS_STAMP := $(VENV)/.medkt-docs-installed
$(DOCS_STAMP): $(STAMP)
	$(PY) -m pip install -q --disable-pip-version-check -c constraints.txt -e ".[docs]"
	touch $(DOCS_STAMP)

docs: $(DOCS_STAMP)
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs build --strict --site-dir site

bench: install
	$(PY) -m benchmarks.run --json benchmark.json

clean:
	rm -rf runs .pytest_cache site
