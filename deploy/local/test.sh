#!/usr/bin/env bash
# Runs every check and test of the repository, the same way on a laptop and in CI:
# backing services up, proto lint, format and lint checks, the Rust unit and
# integration tests (real PostgreSQL, Redis, RabbitMQ; the storefront in headless
# Chromium; schemathesis against /openapi.json), the deployment files' offline
# checks, and the independent Python gRPC client.
set -euo pipefail
cd "$(dirname "$0")/../.."

step() { printf '\n== %s\n' "$*" >&2; }

deploy/local/backing-services.sh

step "buf lint (proto/)"
if ! command -v buf >/dev/null 2>&1; then
  npm install -g --silent @bufbuild/buf@1.75.0
fi
(cd proto && buf lint && buf format --diff --exit-code >/dev/null)

step "docs: every heading of the old front page in its guide, every relative link resolves"
python3 .ci/check_docs.py

step "cargo fmt --check"
cargo fmt --all -- --check

step "cargo clippy --all-targets -D warnings"
cargo clippy --workspace --all-targets --quiet -- -D warnings

step "cargo build --workspace (the tests start the real binaries)"
cargo build --workspace --quiet

step "test tools: Chromium, playwright-core, Python venv (grpcio, pytest, schemathesis)"
if ! [ -x "${CHROMIUM_PATH:-/usr/bin/chromium}" ]; then
  DEBIAN_FRONTEND=noninteractive apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null
fi
npm ci --prefix integration-tests/browser --silent --no-audit --no-fund
VENV=integration-tests/python/.venv
if [ ! -x "$VENV/bin/python" ]; then
  python3 -m venv "$VENV" || {
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-venv >/dev/null
    python3 -m venv "$VENV"
  }
fi
"$VENV/bin/pip" install --quiet --disable-pip-version-check -r integration-tests/python/requirements.txt \
  -r deploy/lint-requirements.txt

step "deploy files: hadolint (Dockerfile), Compose and Kubernetes schemas, yamllint, manifest checks"
"$VENV/bin/hadolint" deploy/docker/Dockerfile
"$VENV/bin/check-jsonschema" --builtin-schema vendor.compose-spec deploy/compose/compose.yaml
"$VENV/bin/yamllint" --strict -c deploy/yamllint.yaml deploy
"$VENV/bin/python" deploy/k8s/check.py target/k8s deploy/k8s/base deploy/k8s/overlays/linkerd deploy/k8s/overlays/istio
# The mesh and operator kinds have no schema offline (kubernetes-validate warns);
# check.py covers them.
"$VENV/bin/kubernetes-validate" --strict --quiet --no-warn target/k8s/*.yaml

step "cargo test --workspace (screenshots and reports: target/test-output/)"
cargo test --workspace

step "Python client (grpcio stubs generated from proto/)"
"$VENV/bin/python" -m pytest -q integration-tests/python
