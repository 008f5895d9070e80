# ML Defender config plane. `make help` lists the targets.
SHELL := /bin/bash
.DEFAULT_GOAL := help

PYTHON      ?= python3.11
VENV        ?= .venv
PY          := $(VENV)/bin/python
STAMP       := $(VENV)/.installed
TOOLS_BIN    = $(shell hack/tools.sh --bindir)
RUN_DIR     ?= $(CURDIR)/.devcluster
# NODE=1 (the default): `cluster-up`/`up` also run a node (containerd, kubelet, kube-proxy,
# CoreDNS; root) and `up` installs the chart on it, so pods really run. NODE=0: the control plane
# and three etcd processes only (faster; pods stay Pending).
NODE        ?= 1
WITH_NODE   := $(filter-out 0 no false,$(NODE))
export PATH := $(CURDIR)/$(VENV)/bin:$(TOOLS_BIN):$(PATH)
export DEFENDER_TOOLS_BIN := $(TOOLS_BIN)

##@ General

.PHONY: help
help: ## Show this help.
	@awk 'BEGIN {FS = ":.*##"; printf "Usage: make \033[36m<target>\033[0m\n"} \
	  /^[a-zA-Z_0-9-]+:.*?##/ { printf "  \033[36m%-20s\033[0m %s\n", $$1, $$2 } \
	  /^##@/ { printf "\n\033[1m%s\033[0m\n", substr($$0, 5) }' $(MAKEFILE_LIST)

##@ Setup

$(STAMP): pyproject.toml requirements/constraints.txt
	@command -v $(PYTHON) >/dev/null || { echo "$(PYTHON) is required"; exit 1; }
	[ -x $(PY) ] || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c requirements/constraints.txt -e '.[dev]'
	touch $@

.PHONY: venv
venv: $(STAMP) ## Create .venv with the package and dev tools (pinned by requirements/constraints.txt).

.PHONY: tools
tools: ## Build kube-apiserver, controller-manager, scheduler, kubectl, etcd, etcdctl, helm, promtool, kubelet, kube-proxy, CoreDNS from Go modules; link Debian containerd/runc/CNI (cached).
	hack/tools.sh

.PHONY: deps
deps: venv tools ## Everything needed to run and test (Python deps + Go-built tools).

##@ Images (OCI archives built without Docker; docs/images.md)

IMAGES      ?=
IMPORT_TO   ?=
IMAGE_ARGS  ?=

.PHONY: images-deps
images-deps: ## Install the Debian packages image builds and their tests use, when missing.
	hack/images.sh --deps

.PHONY: images
images: venv images-deps ## Build pause, etcd, coredns, stand-in and project image archives (cached; etcd and coredns need `make tools`). IMAGES="pause etcd" picks, IMPORT_TO=<containerd socket> loads them.
	hack/images.sh $(IMAGES) $(if $(IMPORT_TO),--import-to $(IMPORT_TO)) $(IMAGE_ARGS)

##@ Local cluster

.PHONY: cluster-up
cluster-up: deps ## Start a local kube-apiserver/controller-manager/scheduler and a 3-member defender etcd, and a node (NODE=0: without).
	$(PY) -m defender_devcluster up --run-dir $(RUN_DIR) $(if $(WITH_NODE),--node)

.PHONY: cluster-down
cluster-down: ## Stop the local cluster (every process by PID).
	-[ -x $(PY) ] && $(PY) -m defender_devcluster down --run-dir $(RUN_DIR)

.PHONY: cluster-status
cluster-status: ## Show the local cluster's processes, endpoints and health.
	$(PY) -m defender_devcluster status --run-dir $(RUN_DIR)

.PHONY: up
up: $(if $(WITH_NODE),images) cluster-up ## Run the whole system locally: the chart on a real node, samples with stand-in workloads and agent sidecars (NODE=0: no node, operator as a process).
	$(PY) -m defender_devcluster system-up --run-dir $(RUN_DIR)

.PHONY: down
down: ## Stop the operator and the local cluster.
	-[ -x $(PY) ] && $(PY) -m defender_devcluster system-down --run-dir $(RUN_DIR)

##@ Development

.PHONY: lint
lint: venv ## ruff (lint + format check) and the import layering contracts (.importlinter).
	$(VENV)/bin/ruff check src operator tests bench
	$(VENV)/bin/ruff format --check src operator tests bench
	$(VENV)/bin/lint-imports --no-cache

.PHONY: fmt
fmt: venv ## Format and autofix with ruff.
	$(VENV)/bin/ruff format src operator tests bench
	$(VENV)/bin/ruff check --fix src operator tests bench

.PHONY: typecheck
typecheck: venv ## mypy --strict on every package (library, agent, operator, plugin, harness).
	$(VENV)/bin/mypy

.PHONY: test-unit
test-unit: venv ## Fast unit tests (no cluster).
	$(PY) -m pytest tests/unit -q

.PHONY: test-integration
test-integration: deps ## Integration tests against the real local control plane and 3-member etcd.
	$(PY) -m pytest tests/harness tests/integration -q

.PHONY: test-node
test-node: deps ## Pods on a real node: Ready, logs/exec, DNS, Services, PVCs, teardown (root).
	$(PY) -m pytest tests/node -q

.PHONY: test-e2e
test-e2e: deps ## End-to-end tests: operator, agent, chart against the real local cluster.
	$(PY) -m pytest tests/e2e -q

.PHONY: test-reliability
test-reliability: deps ## The whole reliability suite (chaos, bad input, rotation under load, hygiene), slow ones included.
	$(PY) -m pytest tests/reliability -q

.PHONY: test
test: deps lint typecheck ## ruff, mypy, unit, integration, end-to-end and the reduced reliability tests.
	$(PY) -m pytest tests -q -m "not slow"

##@ Generated files

.PHONY: crds
crds: venv ## Regenerate crds/ from the operator's API models.
	$(PY) -m defender_operator.crdgen

.PHONY: manifests
manifests: crds tools ## Regenerate crds/, the chart's CRD copies, values.schema.json, manifests/install.yaml and the agent-sidecar example's helper copies.
	hack/render-manifests.sh

.PHONY: verify-manifests
verify-manifests: tools ## Fail if any generated file is stale.
	hack/render-manifests.sh --check

##@ Benchmarks

.PHONY: bench
bench: deps ## Benchmarks vs baselines from the same run: JSON, table and plots under docs/bench/.
	$(PY) bench/run.py

.PHONY: bench-quick
bench-quick: deps ## A few iterations of every benchmark (smoke run).
	$(PY) bench/run.py --quick

.PHONY: fuzz
fuzz: venv ## Fuzz the envelope decoder with >= 1 M generated inputs (only typed errors allowed).
	$(PY) bench/fuzz_envelope.py

##@ Packaging (kind and image targets need Docker, which the dev machine does not have)

# The packaging targets need helm alone: the pinned one if `make tools` built it (first on PATH),
# else any helm on PATH (a kind user's), else helm built by itself (Go, no root) rather than the
# whole toolchain. `make test` and CI still build everything through `deps`.
.PHONY: helm-tool
helm-tool:
	@command -v helm >/dev/null || hack/tools.sh --helm >/dev/null

.PHONY: helm-lint
helm-lint: helm-tool ## helm lint the chart (helm from PATH, else builds helm only).
	helm lint charts/ml-defender

.PHONY: image
image: ## Build the operator/agent image with Docker.
	hack/image.sh

.PHONY: kind-up
kind-up: ## Create a kind cluster from kind-config.yaml (1 control plane, 3 workers).
	hack/kind.sh up

.PHONY: kind-load
kind-load: ## Build the image and load it into the kind cluster.
	hack/kind.sh load

.PHONY: helm-install
helm-install: helm-tool ## helm upgrade --install the chart into the kind cluster, then helm test (helm from PATH, else builds helm only).
	hack/kind.sh helm-install

.PHONY: kind-down
kind-down: ## Delete the kind cluster.
	hack/kind.sh down
