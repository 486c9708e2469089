# Two commands on a fresh machine (see README): `make quickstart` and `make test`.
PY ?= python3
VENV := .venv
STAMP := $(VENV)/.installed

$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	$(VENV)/bin/pip install -q -e '.[demo,dev]'
	touch $(STAMP)

.PHONY: install quickstart test test-fast
install: $(STAMP)

quickstart: $(STAMP)
	$(VENV)/bin/llava-lora quickstart --out quickstart-out --overwrite

test: $(STAMP)
	bash scripts/install_browser.sh $(VENV)
	$(VENV)/bin/pytest -q

test-fast: $(STAMP)
	$(VENV)/bin/pytest -q -m "not slow"
