# Observatory: every target does its own set-up, so `make run` and `make test`
# work on a fresh machine.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
BUF_VERSION := 1.75.0
BUF := tools/node_modules/.bin/buf
PROTO_FILES := $(wildcard protos/observatory/v1/*.proto)
# The last released contract: `buf breaking` compares the protos against it.
RELEASED_PROTOS := released/observatory-v1.binpb

.PHONY: help install run test test-tools lint protos check-protos release-protos token migrate bench clean demo backup buf

help:
	@echo "make run      set up everything and serve on \$${OBSERVATORY_LISTEN:-127.0.0.1:50051}"
	@echo "make test     set up everything and run the test suite"
	@echo "make lint     ruff, mypy, buf lint and breaking, stale-stub check"
	@echo "make protos   regenerate generated/ from protos/"
	@echo "make demo     load demo data into the running server and print a token for it"
	@echo "make backup   pg_dump to \$${OBSERVATORY_BACKUP_URL:-.data/backups} and prune old backups"
	@echo "make buf      install buf (buf curl, buf generate) in tools/node_modules/.bin"
	@echo "make token    print a dev JWT (ROLE=admin for an admin one, SUB=<uuid> to choose the user)"
	@echo "make migrate  alembic upgrade head against DATABASE_URL (or the embedded database)"
	@echo "make bench    run every benchmark suite (BENCH_ARGS=<suite> [--quick] for one); results in bench/results/"

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

run: $(STAMP)
	$(PY) -m server

test: $(STAMP) test-tools
	$(PY) -m pytest $(PYTEST_ARGS)

# nginx for the fleet recipe test (tests/scaling/test_fleet.py), which is
# skipped where nginx is missing and cannot be installed (not root, no apt).
test-tools:
	@command -v nginx >/dev/null || test -x /usr/sbin/nginx || \
		{ test "$$(id -u)" = 0 && command -v apt-get >/dev/null && \
		  { apt-get install -y -qq nginx-light >/dev/null 2>&1 || \
		    { apt-get update -qq >/dev/null 2>&1 && apt-get install -y -qq nginx-light >/dev/null 2>&1; }; }; } || \
		echo "nginx not installed: the fleet recipe test will be skipped"

# Needs a running server (`make run`); progress on stderr, the token on stdout,
# so TOKEN=$$(make -s demo) works.
demo: $(STAMP)
	@$(PY) -m server demo

backup: $(STAMP)
	$(PY) -m server backup $(BACKUP_ARGS)

buf: $(BUF)

token: $(STAMP)
	@$(PY) -m server token --role "$${ROLE:-user}" $${SUB:+--sub "$$SUB"}

migrate: $(STAMP)
	$(PY) -m server migrate

protos: $(STAMP)
	rm -rf generated
	mkdir -p generated
	$(PY) -m grpc_tools.protoc \
		-I protos \
		-I "$$($(PY) -c 'import grpc_tools, os; print(os.path.join(os.path.dirname(grpc_tools.__file__), "_proto"))')" \
		--plugin=protoc-gen-mypy=$(VENV)/bin/protoc-gen-mypy \
		--plugin=protoc-gen-mypy_grpc=$(VENV)/bin/protoc-gen-mypy_grpc \
		--python_out=generated --mypy_out=generated \
		--grpc_python_out=generated --mypy_grpc_out=generated \
		$(PROTO_FILES)
	touch generated/observatory/__init__.py generated/observatory/v1/__init__.py
	touch generated/observatory/py.typed

# Fails when the committed stubs differ from what `make protos` makes.
check-protos: protos
	@test -z "$$(git status --porcelain -- generated)" || \
		{ git status --porcelain -- generated; echo "generated/ is stale: run make protos and commit"; exit 1; }

$(BUF):
	mkdir -p tools
	cd tools && npm install --silent --no-audit --no-fund --no-save @bufbuild/buf@$(BUF_VERSION)

# Run when a contract is released (the protos of a landed change): later
# changes must then stay wire- and source-compatible with it.
release-protos: $(BUF)
	cd protos && ../$(BUF) build -o $(RELEASED_PROTOS)

lint: $(STAMP) $(BUF)
	$(VENV)/bin/ruff check server tests bench migrations
	$(VENV)/bin/ruff format --check server tests bench migrations
	$(VENV)/bin/mypy
	cd protos && ../$(BUF) lint
	cd protos && ../$(BUF) breaking --against $(RELEASED_PROTOS)
	$(MAKE) --no-print-directory check-protos

bench: $(STAMP)
	$(PY) -m bench $(BENCH_ARGS)

clean:
	rm -rf $(VENV) tools/node_modules .pytest_cache .mypy_cache .ruff_cache
