# The operator's and developer's entry points; README.md explains each.
PYTHON ?= python3
VENV ?= .venv
CONFIG ?= etc/workqd/workqd.yaml

.PHONY: run test config-docs deb bench bench-smoke system-test system-test-bookworm system-test-trixie trixie-suite clean

# Runs the daemon in the foreground on the default config against the local RabbitMQ.
run: $(VENV)/.installed
	$(VENV)/bin/workqd -c $(CONFIG)

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	$(VENV)/bin/pip install -q -e .
	touch $@

# The whole test suite (what CI runs), against the broker on 127.0.0.1:5672.
test:
	bash tests/run.sh

# Rewrites the key reference of packaging/man/workqd.yaml.5 and etc/workqd/workqd.yaml
# from workqd/config/schema.py (tests/test_config_schema.py fails while they differ).
config-docs:
	$(PYTHON) -m workqd.config.docgen

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
