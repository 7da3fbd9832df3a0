#!/usr/bin/env bash
# Usage: tests/compat/stop-envd.sh PID
#
# Stops an envd started by run-envd.sh: SIGTERM, then SIGKILL after 5 s, and waits until the
# process is gone. Processes that envd started (commands a test left running) are collected
# by walking the process tree from PID before envd is stopped and are killed too, so the
# private mount namespace (and its /home tmpfs) goes away with them. Only those pids are
# signalled.
set -euo pipefail

pid="${1:?usage: $0 PID}"
[[ "$pid" =~ ^[0-9]+$ ]] || { echo "stop-envd.sh: bad pid '$pid'" >&2; exit 2; }
kill -0 "$pid" 2>/dev/null || exit 0

# Descendants of $pid, found through the ppid links in `ps`.
descendants() {
  ps -e -o pid=,ppid= | awk -v root="$1" '
    { parent[$1] = $2 }
    END {
      for (p in parent) {
        q = p
        while (q in parent && q != root && q > 1) q = parent[q]
        if (q == root && p != root) print p
      }
    }'
}

gone() { ! kill -0 "$1" 2>/dev/null || [[ "$(ps -o stat= -p "$1" 2>/dev/null)" == Z* ]]; }

children="$(descendants "$pid" | tr '\n' ' ')"
kill -TERM "$pid" 2>/dev/null || true
for _ in $(seq 1 50); do
  gone "$pid" && break
  sleep 0.1
done
gone "$pid" || kill -KILL "$pid" 2>/dev/null || true
for c in $children; do kill -KILL "$c" 2>/dev/null || true; done
for _ in $(seq 1 100); do
  gone "$pid" && exit 0
  sleep 0.1
done
echo "stop-envd.sh: pid $pid still alive" >&2
exit 1
