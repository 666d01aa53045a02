# Two entry points on a fresh machine:
#   make demo   install, then run the whole loop on the local cloud
#               (DATA=dir of MNIST IDX files, PORT=local AWS endpoint port,
#               SERVING_PORT=the stable serving address's port,
#               KEEP_RUNNING=1 to keep the local cloud up afterwards)
#   make test   install, then run every check CI runs
# Both create .venv from constraints.txt; `make test` also creates .venv-sam
# for the AWS SAM CLI and .venv-checkov for checkov.

PYTHON ?= python3
VENV := .venv
SAM_VENV := .venv-sam
CHECKOV_VENV := .venv-checkov
BIN := $(VENV)/bin
DATA ?=
PORT ?= 5000
SERVING_PORT ?= 8000
KEEP_RUNNING ?=
DEMO_ARGS := --port $(PORT) --serving-port $(SERVING_PORT) $(if $(DATA),--data $(DATA),) \
	$(if $(KEEP_RUNNING),--keep-running,)

export SAM_CLI_TELEMETRY = 0

.PHONY: install tools browser demo lint build test unit e2e clean

$(BIN)/mnist-pipeline: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet --constraint constraints.txt --editable ".[dev]"
	touch $@

install: $(BIN)/mnist-pipeline

$(SAM_VENV)/bin/sam: constraints.txt
	$(PYTHON) -m venv $(SAM_VENV)
	$(SAM_VENV)/bin/pip install --quiet "$$(grep '^aws-sam-cli==' constraints.txt)"
	touch $@

tools: $(SAM_VENV)/bin/sam

# checkov pins its own boto3 too, one that neither other environment can take.
$(CHECKOV_VENV)/bin/checkov: constraints.txt
	$(PYTHON) -m venv $(CHECKOV_VENV)
	$(CHECKOV_VENV)/bin/pip install --quiet "$$(grep '^checkov==' constraints.txt)"
	touch $@

demo: install
	$(BIN)/mnist-pipeline demo $(DEMO_ARGS)

# checkov fails on any failed check; the template's Metadata skips a check
# for one resource, with the reason. pip-audit needs PyPI's vulnerability
# data, so it runs in the GitHub workflow rather than here.
lint: install tools $(CHECKOV_VENV)/bin/checkov
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/bandit --configfile pyproject.toml --recursive --quiet src functions containers
	$(BIN)/hadolint containers/trainer/Dockerfile containers/server/Dockerfile
	$(BIN)/shellcheck .ci/run scripts/push-images.sh
	$(SAM_VENV)/bin/sam validate --lint --region us-east-1
	$(SAM_VENV)/bin/cfn-lint template.yaml
	$(CHECKOV_VENV)/bin/checkov --file template.yaml --framework cloudformation \
		--skip-download --compact --quiet

# sam build without Docker needs the Lambda runtime's Python (3.13) on PATH;
# without it the step is skipped with a message, and the package checks in
# tests/unit/test_sam_build.py skip too (they fail under CI).
build: tools
	@if command -v python3.13 >/dev/null && python3.13 --version >/dev/null 2>&1; then \
		$(SAM_VENV)/bin/sam build --build-dir .aws-sam/build; \
	else \
		echo "Skipping sam build: python3.13 not found (use sam build --use-container)"; \
	fi

# The drawing page's test drives Debian's Chromium through chromedriver.
# Installing them needs root; without root the step only says so.
browser:
	@if (command -v chromium || command -v google-chrome) >/dev/null \
		&& command -v chromedriver >/dev/null; then \
		true; \
	elif [ "$$(id -u)" = 0 ]; then \
		apt-get update -q && apt-get install -y -q --no-install-recommends chromium chromium-driver; \
	else \
		echo "Install chromium and chromium-driver to run tests/browser"; \
	fi

# Tests that need real MNIST read it from $MNIST_DIR (the four IDX files).
unit: install
	$(BIN)/pytest -m "not e2e"

e2e: install
	$(BIN)/pytest -m e2e

test: lint build browser
	$(BIN)/pytest

clean:
	rm -rf $(VENV) $(SAM_VENV) $(CHECKOV_VENV) .localcloud .pytest_cache .ruff_cache
