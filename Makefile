# The operator's and developer's entry points: README.md explains run, test and deb,
# docs/development.md the others.
PYTHON ?= python3
VENV ?= .venv
CONFIG ?= etc/workqd/workqd.yaml

.PHONY: run local-setup test test-unit config-docs deb bench bench-smoke system-test system-test-bookworm system-test-trixie trixie-suite clean

# Runs the daemon in the foreground on the default config. As root on a fresh
# Debian machine it first installs python3-venv and rabbitmq-server and starts
# the broker (tools/local-setup.sh; a running broker is left as it is).
run: local-setup $(VENV)/.installed
	$(VENV)/bin/workqd -c $(CONFIG)

local-setup:
	bash tools/local-setup.sh python3-venv

$(VENV)/.installed: pyproject.toml | local-setup
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	$(VENV)/bin/pip install -q -e .
	touch $@

# The whole test suite (what CI runs), against the broker on 127.0.0.1:5672.
test:
	bash tests/run.sh

# Rewrites the key reference of packaging/man/workqd.yaml.5 and etc/workqd/workqd.yaml
# from workqd/config/schema.py (tests/unit/test_config_schema.py fails while they differ).
config-docs:
	$(PYTHON) -m workqd.config.docgen

# The loop while editing: one file per module, no broker, under a minute.
test-unit: $(VENV)/.installed
	$(VENV)/bin/pip install -q pytest hypothesis
	$(VENV)/bin/python -m pytest tests/unit -q

# Builds dist/workqd_<version>_all.deb in a temporary copy of the tree.
deb:
	bash packaging/build-deb.sh

system-test:
	bash tests/system/run.sh

# The .deb under systemd in a booted container of one release (root).
system-test-bookworm:
	bash tests/system/run.sh --suite bookworm

system-test-trixie:
	bash tests/system/run.sh --suite trixie

# The behaviour suite on trixie's Python, python3-* packages and RabbitMQ 4.0 (root).
trixie-suite:
	bash tests/system/trixie-suite.sh

# The benchmark suite: writes bench/RESULTS.md and bench/results.png.
bench:
	bash bench/run.sh

bench-smoke:
	bash bench/run.sh --smoke

clean:
	rm -rf $(VENV) build dist *.egg-info .pytest_cache
