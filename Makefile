# Two commands set everything up on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# The CPU build of torch lies on this kind of machine's disk; a plain PyPI torch is a CUDA build.
FIND_LINKS := $(if $(wildcard /opt/wheels),--find-links /opt/wheels)
STAMP := $(VENV)/.installed
NODE_STAMP := node_modules/.installed

.PHONY: demo test lint unit bench reliability env node-env clean systemd-tools

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q $(FIND_LINKS) -c constraints.txt -e '.[torch,dev]'
	touch $(STAMP)

env: $(STAMP)

$(NODE_STAMP): package.json package-lock.json
	npm ci --no-audit --no-fund --loglevel=error
	touch $(NODE_STAMP)

node-env: $(NODE_STAMP)

# systemd-analyze verifies the unit files; install it where the machine lacks it.
systemd-tools:
	@command -v systemd-analyze >/dev/null 2>&1 || { \
	  echo "installing systemd (for systemd-analyze)"; \
	  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq systemd >/dev/null) || \
	  echo "warning: could not install systemd; unit verification tests will fail"; }

demo: $(STAMP)
	$(PY) -m examples.demo

lint: $(STAMP)
	$(VENV)/bin/ruff check uploader ckpt harness tests bench examples
	$(VENV)/bin/ruff format --check uploader ckpt harness tests bench examples
	$(VENV)/bin/mypy uploader ckpt harness

# Test modules run in parallel processes (each module whole, on one of them: module
# fixtures such as a trainer run are made once); the suite mostly waits on servers and
# trainers, so three processes keep two cores busy. TEST_WORKERS=0 runs them in one.
TEST_WORKERS ?= 3

unit: $(STAMP) $(NODE_STAMP) systemd-tools
	$(VENV)/bin/pytest -q --durations=15 -n $(TEST_WORKERS) --dist loadfile $(PYTEST_ARGS)

test: lint unit

bench: $(STAMP)
	$(PY) -m bench.transfer
	$(PY) -m bench.restore
	$(PY) -m bench.restore_dir
	$(PY) -m bench.restore_dir --latency-ms 20
	$(PY) -m bench.many_files
	$(PY) -m bench.upload_tls
	$(PY) -m bench.latest
	$(PY) -m bench.concurrent_restore
	$(PY) -m bench.stall
	$(PY) -m bench.daemon
	$(PY) -m bench.integrations
	$(PY) -m bench.resume
	$(PY) -m bench.keepup
	$(PY) -m bench.dedup

reliability: $(STAMP) $(NODE_STAMP)
	$(PY) -m bench.reliability

clean:
	rm -rf $(VENV) node_modules .pytest_cache .mypy_cache .ruff_cache
