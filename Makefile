# The commands everyone can rely on. Each target installs what it needs (hack/bootstrap.sh).
.PHONY: demo demo-local test unit lint sanity cluster-up cluster-down bench bootstrap protos

bootstrap:
	@hack/bootstrap.sh

demo: bootstrap
	@hack/demo.sh

demo-local: bootstrap
	@hack/demo-local.sh

test: bootstrap
	@hack/test.sh

unit: bootstrap
	@.venv/bin/python -m pytest unit

lint: bootstrap
	@.venv/bin/ruff check . && .venv/bin/ruff format --check . && .venv/bin/mypy

sanity: bootstrap
	@hack/sanity.sh

cluster-up:
	@e2e/cluster/up.sh

cluster-down:
	@e2e/cluster/down.sh

bench: bootstrap
	@e2e/bench/run.sh

protos: bootstrap
	@protos/generate.sh
