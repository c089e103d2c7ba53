# Modelyo: `make demo` and `make test` set everything up on a fresh machine (see README.md).

PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
# Rewritten after each successful install: pip runs again only when pyproject.toml is newer.
STAMP := $(VENV)/.modelyo-installed
PYTEST_ARGS ?=

.PHONY: test demo lint venv docker base-image

test: venv docker base-image
	$(BIN)/pytest $(PYTEST_ARGS)

demo: venv docker base-image
	$(BIN)/python -m modelyo.demo

lint: venv
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

venv: $(STAMP)

$(STAMP): pyproject.toml
	@command -v $(PYTHON) >/dev/null || { echo "make: $(PYTHON) not found; install Python 3.11 or run make PYTHON=/path/to/python3.11" >&2; exit 1; }
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --disable-pip-version-check -q -e '.[dev]'
	touch $@

# Fast when an engine already answers: the script exits after one `docker info`.
docker:
	scripts/ensure-docker.sh

# Internal: build-base reuses the image at once when its inputs hash is unchanged.
base-image: venv docker
	$(BIN)/modelyo image build-base
