#!/usr/bin/env bash
# The whole test suite, on a fresh Debian 12 machine: installs what the tests need when it is
# missing (cmake to build pingora, curl, redis-server for the Redis store's tests, Python
# `requests` and `httpx`, Go and Node's undici as interception clients), then runs every test. The tests start their own redis-server on a free port, and
# their own 3-master Redis Cluster (redis-server --cluster-enabled, redis-cli --cluster create).
set -euo pipefail
cd "$(dirname "$0")/.."

missing=()
command -v cmake >/dev/null || missing+=(cmake)
command -v curl >/dev/null || missing+=(curl)
command -v redis-server >/dev/null || missing+=(redis-server)
command -v redis-cli >/dev/null || missing+=(redis-tools)
command -v python3 >/dev/null || missing+=(python3 python3-pip)
# Real clients of TLS interception (tests/intercept.rs): Go's net/http and Node's undici.
command -v go >/dev/null || missing+=(golang-go)
command -v npm >/dev/null || missing+=(nodejs npm)
if [ ${#missing[@]} -gt 0 ]; then
  echo "installing: ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq && apt-get install -y -qq "${missing[@]}"
fi
# Python `requests` and `httpx` (real clients for the proxy and its TLS interception), openapi-spec-validator (checks the admin
# API's OpenAPI 3.1 document), prometheus-client (parses /metrics) and PyYAML (counts the
# operations of the OpenAPI fixtures independently of `sluice connector import`).
for module in requests:requests httpx:httpx openapi_spec_validator:openapi-spec-validator prometheus_client:prometheus-client yaml:pyyaml; do
  if ! python3 -c "import ${module%%:*}" 2>/dev/null; then
    python3 -m pip install --quiet "${module#*:}" \
      || python3 -m pip install --quiet --break-system-packages "${module#*:}"
  fi
done

# undici (Node's HTTP client, whose ProxyAgent tunnels every URL), outside the source tree.
if [ ! -d target/test-node/node_modules/undici ]; then
  npm install --silent --prefix target/test-node undici@6 --no-audit --no-fund
fi

# Every test, unit, integration and the criterion benches' smoke runs. The pingora floor (an
# example used by benches/load.py) has no tests: it is built, not run, so the last lines of
# this output are the suite's own.
cargo build --examples
cargo test --lib --bins --tests --benches
