#!/usr/bin/env bash
# Usage: tests/compat/run-envd.sh BINARY PORT [extra envd args...]
#
# Starts an arca-envd binary as root, listening on PORT (all addresses), inside a private mount
# namespace that looks like an E2B template as far as users go:
#   - /etc/passwd and /etc/group are bind-mounted from temporary copies that contain a user
#     `user` (uid 1000, gid 1000, home /home/user, shell /bin/bash); whatever entry held uid/gid
#     1000 or the name `user` on the host is dropped from the copies;
#   - /home is a fresh tmpfs holding /home/user (1000:1000, 0755).
# Nothing changes on the host: the mounts live and die with the namespace.
#
# Prints the envd pid on stdout (and appends it as a line to $ENVD_PIDFILE when set), returns once
# `GET http://127.0.0.1:PORT/health` answers 204. envd's output goes to $ENVD_LOG
# (default: ${TMPDIR:-/tmp}/arca-envd-PORT.log). Stop it with tests/compat/stop-envd.sh PID.
set -euo pipefail

if (($# < 2)); then
  echo "usage: $0 BINARY PORT [extra envd args...]" >&2
  exit 2
fi
bin="$1"
port="$2"
shift 2

[[ "$(id -u)" == 0 ]] || { echo "run-envd.sh: must run as root (needs a mount namespace)" >&2; exit 1; }
[[ -x "$bin" ]] || { echo "run-envd.sh: $bin is not an executable file" >&2; exit 1; }
[[ "$port" =~ ^[0-9]+$ ]] || { echo "run-envd.sh: bad port '$port'" >&2; exit 2; }
bin="$(cd "$(dirname "$bin")" && pwd)/$(basename "$bin")"
log="${ENVD_LOG:-${TMPDIR:-/tmp}/arca-envd-${port}.log}"
health="http://127.0.0.1:${port}/health"

# Refuse to start when something already answers on the port: the health wait below would
# otherwise succeed against the wrong process.
if curl -s -o /dev/null --max-time 2 "$health"; then
  echo "run-envd.sh: port $port is already in use" >&2
  exit 1
fi

etc="$(mktemp -d "${TMPDIR:-/tmp}/arca-envd-etc.XXXXXX")"
awk -F: -v OFS=: '$1 != "user" && $3 != 1000' /etc/passwd >"$etc/passwd"
echo 'user:x:1000:1000:user:/home/user:/bin/bash' >>"$etc/passwd"
awk -F: -v OFS=: '$1 != "user" && $3 != 1000' /etc/group >"$etc/group"
echo 'user:x:1000:' >>"$etc/group"
chmod 0644 "$etc/passwd" "$etc/group"

# The inner script runs in the new mount namespace (unshare without --fork execs it in the same
# process) and finally execs envd, so the pid of the background job below is envd's pid. The
# temporary copies are unlinked right after being bind-mounted: the mounts keep them alive.
# shellcheck disable=SC2016
inner='
set -e
etc="$1"; bin="$2"; port="$3"; shift 3
mount --bind "$etc/passwd" /etc/passwd
mount --bind "$etc/group" /etc/group
rm -rf "$etc"
mount -t tmpfs -o mode=0755,size=2g arca-home /home
mkdir -m 0755 /home/user
chown 1000:1000 /home/user
cd /
exec "$bin" --port "$port" "$@"
'
unshare --mount --propagation private -- /bin/bash -c "$inner" arca-envd-ns "$etc" "$bin" "$port" "$@" \
  </dev/null >"$log" 2>&1 &
pid=$!
if [[ -n "${ENVD_PIDFILE:-}" ]]; then echo "$pid" >>"$ENVD_PIDFILE"; fi

# Wait (bounded) for /health to answer 204; fail early when envd dies.
for _ in $(seq 1 300); do
  code="$(curl -s -o /dev/null -w '%{http_code}' --max-time 2 "$health" || true)"
  if [[ "$code" == 204 ]]; then
    echo "$pid"
    exit 0
  fi
  if ! kill -0 "$pid" 2>/dev/null; then
    rm -rf "$etc"
    echo "run-envd.sh: envd exited before becoming healthy; log $log:" >&2
    tail -n 50 "$log" >&2 || true
    exit 1
  fi
  sleep 0.1
done
echo "run-envd.sh: envd (pid $pid) not healthy on $health after 30 s (last status '$code'); log $log:" >&2
tail -n 50 "$log" >&2 || true
kill -KILL "$pid" 2>/dev/null || true
exit 1
