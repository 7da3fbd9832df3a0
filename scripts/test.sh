#!/usr/bin/env bash
# The one command that runs every check and test (CI runs it through .ci/run):
#   setup -> rustfmt -> clippy -> static musl build of arca-envd -> debug build of arca -> base
#   template cache -> PostgreSQL server for the api tests -> nextest -> SDK compatibility suites
#   (Python e2b 2.63.0 and 2.45.1, JS e2b 2.51.0) against that envd -> end-to-end suites (the
#   same SDKs against `arca up`, as root; tests/e2e) -> cluster suite (PostgreSQL, api, proxy and
#   three nodes; tests/cluster).
#
# Environment:
#   ARCA_TEST_SKIP_CARGO=1  skip fmt/clippy/nextest/build and test existing binaries
#   ARCA_ENVD_BIN           envd for the SDK suites and in sandboxes (default: musl release build)
#   ARCA_BIN                arca for the end-to-end suites (default: target/debug/arca)
#   ARCA_E2E_CACHE          where `arca up` builds the base template once (tests/e2e/harness.py)
#   ARCA_VM_ASSETS          guest kernel and modules of the vm runtime (default /var/cache/arca-test/vm)
#   ARCA_TEST_PG_URL        PostgreSQL server for the api tests (default: a throw-away one started
#                           with scripts/pg.sh; the role must be allowed to create databases)
# Exits non-zero when any step fails; the SDK suites all run even if one of them fails.
set -euo pipefail

repo="$(cd "$(dirname "$0")/.." && pwd)"
cd "$repo"

step() { printf '\n==> %s\n' "$*"; }

work="$(mktemp -d "${TMPDIR:-/tmp}/arca-test.XXXXXX")"
export ENVD_PIDFILE="$work/envd.pids" # run-envd.sh appends every envd it starts
: >"$ENVD_PIDFILE"

# Stop whatever envd the suites started and did not stop themselves (e.g. after a timeout), and
# the PostgreSQL server of the api tests.
cleanup() {
  local pid
  while read -r pid; do
    [[ -n "$pid" ]] && "$repo/tests/compat/stop-envd.sh" "$pid" >/dev/null 2>&1 || true
  done <"$ENVD_PIDFILE"
  "$repo/scripts/pg.sh" stop "$work/pg" >/dev/null 2>&1 || true
  rm -rf "$work"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

step "setup"
scripts/setup.sh
# The vm runtime's kernel and modules, fetched by setup.sh.
export ARCA_VM_ASSETS="${ARCA_VM_ASSETS:-/var/cache/arca-test/vm}"
# setup.sh installs runsc and the VM assets: their tests must run, not skip.
export ARCA_E2E_REQUIRE_RUNTIMES="${ARCA_E2E_REQUIRE_RUNTIMES:-gvisor,vm}"

if [[ "${ARCA_TEST_SKIP_CARGO:-0}" != 1 ]]; then
  step "cargo fmt"
  cargo fmt --all -- --check

  step "cargo clippy"
  cargo clippy --workspace --all-targets --locked -- -D warnings

  # The sandbox tests run this static envd inside real sandboxes: build it first.
  step "static arca-envd (musl, release)"
  cargo build --release --locked -p arca-envd --target x86_64-unknown-linux-musl

  # nextest builds test profiles only; the end-to-end suites run the real `arca`.
  step "arca (debug build for the end-to-end suites)"
  cargo build --locked -p arca-cli

  # Root-only tests start real sandboxes from the base template: `arca up`
  # builds it once (debootstrap, a few minutes on a fresh machine) into a cache.
  step "base template (cached)"
  ARCA_TEST_BASE_HOME="$(ARCA_BIN="$repo/target/debug/arca" \
    ARCA_ENVD_BIN="$repo/target/x86_64-unknown-linux-musl/release/arca-envd" \
    "$repo/.cache/venv/e2b-2.63.0/bin/python" tests/e2e/harness.py cache)"
  export ARCA_TEST_BASE_HOME

  # The api's database tests run on SQLite and, given ARCA_TEST_PG_URL, on PostgreSQL too: by
  # default on a throw-away server (run by the postgres user, who needs to reach it: chmod 711).
  step "PostgreSQL for the api tests"
  if [[ -z "${ARCA_TEST_PG_URL:-}" ]]; then
    chmod 711 "$work"
    ARCA_TEST_PG_URL="$(scripts/pg.sh start "$work/pg")"
  fi
  export ARCA_TEST_PG_URL
  echo "$ARCA_TEST_PG_URL"

  step "cargo nextest"
  ARCA_TEST_PRIVILEGED=1 cargo nextest run --workspace --locked 2>&1 | tee "$work/nextest.log"
fi

bin="${ARCA_ENVD_BIN:-$repo/target/x86_64-unknown-linux-musl/release/arca-envd}"
export ARCA_ENVD_BIN="$bin"
kind="$(file -b -L "$bin")"
echo "$bin: $kind"
if [[ "$kind" == *"dynamically linked"* || ! "$kind" =~ static(-pie)?\ linked ]]; then
  echo "FAIL: $bin is not statically linked" >&2
  exit 1
fi

# Each suite gets its own ports (the Python access-token module uses PORT + 1) and a time
# bound; a failing suite does not stop the others.
failed=()
summaries=()
run_suite() {
  local name="$1" port="$2" dir="$3"
  shift 3
  step "$name"
  local log="$work/$name.log" rc=0
  rm -f "${TMPDIR:-/tmp}/arca-envd-$port.log" "${TMPDIR:-/tmp}/arca-envd-$((port + 1)).log"
  (cd "$dir" && ARCA_ENVD_PORT="$port" timeout --kill-after=30 1200 "$@") 2>&1 | tee "$log" || rc=$?
  if ((rc != 0)); then
    failed+=("$name (exit $rc)")
    local p
    for p in "$port" "$((port + 1))"; do
      if [[ -s "${TMPDIR:-/tmp}/arca-envd-$p.log" ]]; then
        echo "--- last lines of ${TMPDIR:-/tmp}/arca-envd-$p.log"
        tail -n 40 "${TMPDIR:-/tmp}/arca-envd-$p.log"
      fi
    done
  fi
  summaries+=("$name: $(grep -E '^(=+ .* in [0-9.]+s|# (tests|pass|fail|cancelled|skipped) [0-9]+)' "$log" | sed 's/=//g' | tr '\n' ' ' | tr -s ' ')")
}

for ver in 2.63.0 2.45.1; do
  # Below the ephemeral range (32768-60999): an outgoing connection of some
  # other test can hold a port there and make envd's bind fail.
  case "$ver" in 2.63.0) port=29911 ;; 2.45.1) port=29921 ;; esac
  run_suite "python-e2b-$ver" "$port" tests/compat/python \
    "$repo/.cache/venv/e2b-$ver/bin/python" -m pytest
done
run_suite "js-e2b-2.51.0" 29931 tests/compat/js \
  node --test --test-timeout=120000 --test-reporter=tap envd.test.mjs

# End to end: each suite starts its own `arca up` (fresh home, random ports and network
# prefix; the base template is built once into ARCA_E2E_CACHE) and checks the host is clean
# afterwards. The port argument of run_suite is unused here.
export ARCA_BIN="${ARCA_BIN:-$repo/target/debug/arca}"
for ver in 2.63.0 2.45.1; do
  run_suite "e2e-python-e2b-$ver" 0 tests/e2e "$repo/.cache/venv/e2b-$ver/bin/python" -m pytest
done
run_suite "e2e-js-e2b-2.51.0" 0 tests/e2e "$repo/.cache/venv/e2b-2.63.0/bin/python" harness.py run -- \
  node --test --test-timeout=120000 --test-reporter=tap js/sandbox.test.mjs
# Cluster mode: PostgreSQL, `arca api` (and a second replica), `arca proxy` and three `arca node`s
# in network namespaces of their own, through the current Python SDK (tests/cluster).
run_suite "cluster-python-e2b-2.63.0" 0 tests/cluster "$repo/.cache/venv/e2b-2.63.0/bin/python" -m pytest

step "summary"
printf '%s\n' "${summaries[@]}"
# One closing line over every runner: nextest, pytest (both SDKs) and node.
count() { # count WORD -> sum of "<n> WORD" / "# WORD <n>" over the logs
  cat "$work"/*.log 2>/dev/null | grep -oE "([0-9]+ $1\b|^# $1 [0-9]+)" | grep -oE '[0-9]+' | awk '{s += $1} END {print s + 0}'
}
total_pass=$(( $(count passed) + $(count pass) ))
total_fail=$(( $(count failed) + $(count fail) ))
total_skip=$(( $(count skipped) ))
if ((${#failed[@]})); then
  printf 'FAILED: %s\n' "${failed[@]}" >&2
  echo "total: $total_pass passed, $((total_fail > 0 ? total_fail : 1)) failed, $total_skip skipped"
  exit 1
fi
echo "total: $total_pass passed, $total_fail failed, $total_skip skipped"
