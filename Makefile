# Two commands on a fresh machine: `make demo` and `make test`. Both run `make setup` first.
PY ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.setup-stamp
APT_PKGS := wordnet-base dataset-fashion-mnist chromium openjdk-17-jre-headless libcairo2
OPENMOJI := openmoji-17.0.0
export PIP_DISABLE_PIP_VERSION_CHECK := 1
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: setup demo test test-slow lint bench bench-stale clean-cache

setup: $(STAMP)

$(STAMP): pyproject.toml requirements/dev.txt requirements/nodeps.txt
	@if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	  missing=""; for p in $(APT_PKGS); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	  if [ -n "$$missing" ]; then echo "apt-get install$$missing"; \
	    (apt-get install -y -q $$missing || (apt-get update -q && apt-get install -y -q $$missing)) >/dev/null; fi; \
	else echo "not root or no apt-get: install Debian packages $(APT_PKGS) yourself (WordNet, Fashion-MNIST, the report browser test, Java for the caption metrics)"; fi
	@test -x $(BIN)/python || $(PY) -m venv $(VENV) || python3 -m venv $(VENV)
	$(BIN)/pip install -q -r requirements/dev.txt
	$(BIN)/pip install -q -c requirements/dev.txt -e .
	$(BIN)/pip install -q --no-deps -r requirements/nodeps.txt
	@# OpenMoji (npm): the style set lite-clip's build learns "line drawing" / "cartoon" from
	@test -f $(VENV)/share/openmoji/package.json || { rm -rf $(VENV)/share/openmoji.tmp && \
	  mkdir -p $(VENV)/share/openmoji.tmp && cd $(VENV)/share && npm pack -q $(subst -,@,$(OPENMOJI)) >/dev/null && \
	  tar xzf $(OPENMOJI).tgz -C openmoji.tmp --strip-components=1 && rm $(OPENMOJI).tgz && \
	  rm -rf openmoji && mv openmoji.tmp openmoji; } || \
	  echo "npm openmoji not unpacked: conceptlens build lite-clip needs it (the shipped weights do not)"
	@touch $(STAMP)

demo: setup
	$(BIN)/conceptlens demo --report out/demo --overwrite

lint: setup
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/lint-imports

test: lint
	$(BIN)/python -m pytest tests -m "not slow"

test-slow: setup  # heavy real-data floors (../shared): CI runs them after `make test`
	$(BIN)/python -m pytest tests -m slow

bench: setup
	$(BIN)/python benchmarks/run_all.py

bench-stale: setup  # which result files ran from code that has changed since (exit 1 if any)
	$(BIN)/python benchmarks/stale.py

clean-cache:
	rm -rf $${CONCEPTLENS_CACHE:-$$HOME/.cache/conceptlens}
