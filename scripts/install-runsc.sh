#!/usr/bin/env bash
# Installs gVisor's runsc for Arca's `gvisor` runtime as /usr/local/bin/runsc (which the node
# finds before Debian's /usr/bin/runsc on PATH). Idempotent; about 10 s.
#
# Why not Debian 12's own `runsc` package: its 2022 release rejects statx(AT_NO_AUTOMOUNT), so
# `ls -l` and `stat` fail inside sandboxes, and has no systrap platform. Debian unstable's
# 2024 build panics on its first blocking file read (built with a Go newer than that gVisor
# supports). bookworm-backports carries the 2024 release built with Go 1.22, which works; it
# is one statically linked binary, so it is taken from that package without installing it
# (no other package changes). Source: the Debian mirror apt already uses.
#
# Usage: scripts/install-runsc.sh [--force]
set -euo pipefail

dest=/usr/local/bin/runsc
want_version="0.0~20240729.0-4~bpo12+2"
want_date=20240729

log() { printf '[install-runsc] %s\n' "$*"; }
die() { printf 'install-runsc: %s\n' "$*" >&2; exit 1; }

have_date() {
  "$dest" --version 2>/dev/null | head -1 | grep -o '[0-9]\{8\}' | head -1
}
if [[ "${1:-}" != --force && -x "$dest" ]]; then
  d=$(have_date || true)
  if [[ -n "$d" && "$d" -ge "$want_date" ]]; then
    log "runsc $("$dest" --version | head -1 | awk '{print $3}') already at $dest"
    exit 0
  fi
fi

mirror=$(sed -n 's/^URIs: *//p' /etc/apt/sources.list.d/*.sources 2>/dev/null | grep -v security | head -1 || true)
[[ -n "$mirror" ]] || mirror=$(awk '$1 == "deb" && $2 !~ /security/ {print $2; exit}' /etc/apt/sources.list 2>/dev/null || true)
[[ -n "$mirror" ]] || die "cannot find the Debian mirror in apt's sources"

side=$(mktemp -d)
trap 'rm -rf "$side"' EXIT
chmod 755 "$side"
mkdir -p "$side/lists/partial" "$side/cache/archives/partial"
echo "deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] $mirror bookworm-backports main" >"$side/sources.list"
opts=(-o "Dir::Etc::SourceList=$side/sources.list" -o Dir::Etc::SourceParts=- -o "Dir::State::Lists=$side/lists"
  -o "Dir::Cache=$side/cache" -o APT::Sandbox::User=root)
log "fetching runsc $want_version from $mirror bookworm-backports"
apt-get "${opts[@]}" -qq update >/dev/null
(cd "$side" && apt-get "${opts[@]}" -qq download "runsc=$want_version" >/dev/null) ||
  die "could not download runsc=$want_version from bookworm-backports"
deb=$(ls "$side"/runsc_*.deb | head -1)
dpkg-deb -x "$deb" "$side/x"
[[ -x "$side/x/usr/bin/runsc" ]] || die "the package holds no usr/bin/runsc"
install -m 0755 "$side/x/usr/bin/runsc" "$dest.new"
mv -f "$dest.new" "$dest"
log "installed $("$dest" --version | head -1) at $dest"
