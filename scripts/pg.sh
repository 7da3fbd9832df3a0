#!/usr/bin/env bash
# A throw-away PostgreSQL cluster for tests (the api's PostgreSQL backend, issue 7).
#
#   scripts/pg.sh start DIR   make a cluster in DIR/data, start it and print its URL,
#                             postgres://arca@127.0.0.1:PORT/arca, on stdout
#   scripts/pg.sh stop DIR    stop the cluster that `start DIR` made (nothing else)
#
# NOT for real data: authentication is `trust` (any local user can connect as any role), fsync is
# off and the cluster lives wherever DIR is. It listens on 127.0.0.1 only, at a free port, with its
# unix socket in DIR. Role and database `arca` exist; the role may create databases (the api tests
# make one per test). The server log is DIR/log. As root, the cluster runs as the `postgres`
# system user (PostgreSQL refuses to run as root), which must be able to reach DIR: a parent
# directory made by mktemp needs `chmod 711`.
set -euo pipefail

die() { echo "pg.sh: $*" >&2; exit 1; }
usage() { die "usage: pg.sh start|stop DIR"; }

(($# == 2)) || usage
cmd="$1"
[[ -n "$2" ]] || usage
dir="$(realpath -m -- "$2")"
# Written by `start`: tells `stop` this DIR is ours.
marker="$dir/pg.sh-cluster"

# initdb/pg_ctl/psql live in a versioned directory on Debian; take the newest.
bindir=""
for d in /usr/lib/postgresql/*/bin; do
  [[ -x "$d/initdb" ]] && bindir="$d"
done
if [[ -z "$bindir" ]]; then
  bindir="$(dirname "$(command -v initdb 2>/dev/null || echo /nonexistent/initdb)")"
fi
[[ -x "$bindir/initdb" ]] || die "no initdb under /usr/lib/postgresql/*/bin or on PATH: install postgresql (scripts/setup.sh)"

# Runs a PostgreSQL program as the cluster's owner.
as_owner() {
  if ((EUID == 0)); then
    runuser -u postgres -- "$@"
  else
    "$@"
  fi
}

# A port nobody listens on, below the ephemeral range (32768-60999) so an outgoing connection
# cannot be holding it. Another process may still take it before the server binds: start retries.
free_port() {
  local port
  for _ in $(seq 50); do
    port=$((20000 + RANDOM % 12000))
    if ! (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then
      echo "$port"
      return
    fi
  done
  die "no free port found on 127.0.0.1"
}

start() {
  [[ ! -e "$dir/data" ]] || die "$dir/data exists: stop that cluster and use a fresh DIR"
  mkdir -p "$dir"
  if ((EUID == 0)); then
    id postgres >/dev/null 2>&1 || die "no 'postgres' system user: install postgresql (scripts/setup.sh)"
    chown postgres: "$dir"
    as_owner test -w "$dir" ||
      die "user postgres cannot write $dir: give its parent directories o+x (chmod 711)"
  fi
  : >"$marker"
  # The server appends to the log as its owner.
  as_owner touch "$dir/log"

  # C locale: text sorts by bytes, as in SQLite (see crates/api/src/db/dialect.rs).
  as_owner "$bindir/initdb" -D "$dir/data" -U postgres --auth=trust --encoding=UTF8 \
    --locale=C --no-sync >>"$dir/log" 2>&1 || die "initdb failed, see $dir/log"
  cat >"$dir/data/pg_hba.conf" <<'EOF'
# pg.sh: throw-away test cluster, no passwords. Unix socket (in the cluster's DIR) and
# 127.0.0.1 only.
local all all              trust
host  all all 127.0.0.1/32 trust
EOF

  local port="" try
  for try in 1 2 3 4 5; do
    port="$(free_port)"
    # fsync and friends off: nothing here needs to survive a crash.
    if as_owner "$bindir/pg_ctl" -D "$dir/data" -l "$dir/log" -w -t 60 start -o \
      "-c listen_addresses=127.0.0.1 -c port=$port -c unix_socket_directories='$dir' \
       -c max_connections=300 -c fsync=off -c synchronous_commit=off \
       -c full_page_writes=off" >>"$dir/log" 2>&1; then
      break
    fi
    # Someone else took the port between the check and the bind: try another one.
    grep -q 'could not bind\|could not create any TCP/IP sockets' "$dir/log" ||
      die "the server did not start, see $dir/log"
    port=""
    echo "pg.sh: port taken, retrying ($try)" >>"$dir/log"
  done
  [[ -n "$port" ]] || die "the server did not start, see $dir/log"
  echo "$port" >"$marker"

  local psql=("$bindir/psql" -X -q -v ON_ERROR_STOP=1 -h "$dir" -p "$port" -U postgres -d postgres)
  as_owner "${psql[@]}" -c "CREATE ROLE arca LOGIN CREATEDB" >>"$dir/log" 2>&1 ||
    die "creating role arca failed, see $dir/log"
  as_owner "${psql[@]}" -c "CREATE DATABASE arca OWNER arca" >>"$dir/log" 2>&1 ||
    die "creating database arca failed, see $dir/log"
  # pg_ctl -w waited for the socket; this checks the TCP listener the tests use.
  as_owner "$bindir/pg_isready" -q -h 127.0.0.1 -p "$port" -U arca -d arca -t 30 ||
    die "the server does not accept connections on 127.0.0.1:$port, see $dir/log"
  echo "postgres://arca@127.0.0.1:$port/arca"
}

stop() {
  if [[ ! -e "$marker" ]]; then
    [[ ! -e "$dir/data" ]] || die "$dir/data was not made by pg.sh start: not stopping it"
    return 0 # nothing was started here
  fi
  [[ -f "$dir/data/postmaster.pid" ]] || return 0 # not running (start failed, or stopped)
  as_owner "$bindir/pg_ctl" -D "$dir/data" -w -t 60 stop -m fast >>"$dir/log" 2>&1 ||
    die "stopping the cluster in $dir failed, see $dir/log"
}

case "$cmd" in
  start) start ;;
  stop) stop ;;
  *) usage ;;
esac
