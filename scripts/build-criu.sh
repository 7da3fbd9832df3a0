#!/usr/bin/env bash
# Builds CRIU (checkpoint/restore in userspace) from Debian unstable's source package and installs
# the binary as /usr/local/sbin/criu. Arca's sandbox snapshots need CRIU >= 4.2: Debian 12 ships
# 3.17, which cannot parse the vDSO of kernels >= 6.13, and 4.1 fails to dump TCP sockets on
# kernels >= 6.16. Run as root on Debian 12 (bookworm).
#
# How: build dependencies come from the machine's own apt sources (bookworm); the CRIU source
# comes from sid through a throw-away apt configuration in a temp dir (its own sources.list, lists
# and cache; the system's sources.list.d is ignored), so the system's apt state is never touched.
# Only the upstream tarball is built (`make criu`), nothing from Debian's packaging.
#
# Idempotent: does nothing when /usr/local/sbin/criu is already >= 4.2 and `criu check` passes.
# Usage: scripts/build-criu.sh [--force]    (--force rebuilds anyway)
# Env:   CRIU_DEBIAN_MIRROR=http://...     overrides the mirror read from apt's sources.
# Takes about a minute on 2 cores once the build dependencies are installed.
set -euo pipefail

dest=/usr/local/sbin/criu
min_version=4.2
force=0

say() { printf '[build-criu] %s\n' "$*"; }
die() { printf '[build-criu] error: %s\n' "$*" >&2; exit 1; }

for arg in "$@"; do
  case "$arg" in
    --force) force=1 ;;
    -h | --help) sed -n '2,15s/^# \{0,1\}//p' "$0"; exit 0 ;;
    *) die "unknown argument '$arg' (usage: $0 [--force])" ;;
  esac
done

[ "$(id -u)" -eq 0 ] || die "must run as root (it installs packages and $dest); try: sudo $0"
command -v apt-get >/dev/null || die "apt-get not found: this script supports Debian (12 or later) only"

# Prints the version of a criu binary ("4.2.1"), or nothing.
criu_version() { "$1" --version 2>/dev/null | awk '$1 == "Version:" {print $2; exit}'; }

# True when $1 is a usable criu: new enough and `criu check` passes on this kernel.
criu_usable() {
  local v
  [ -x "$1" ] || return 1
  v=$(criu_version "$1")
  [ -n "$v" ] && dpkg --compare-versions "$v" ge "$min_version" && "$1" check >/dev/null 2>&1
}

if [ "$force" -eq 0 ] && criu_usable "$dest"; then
  say "criu $(criu_version "$dest") already installed at $dest and 'criu check' passes (use --force to rebuild)"
  exit 0
fi

# ---------------------------------------------------------------------------------------------
# 1. Build dependencies, from the system's own apt sources.
#    Required by CRIU's Makefile.packages: protoc with the protobuf-c plugin, descriptor.proto
#    (libprotobuf-dev), libprotobuf-c, libnl-3, libnet, libcap, libuuid.
#    Optional features we want: libnftables (--network-lock nftables; this machine kind has no
#    iptables), libbsd (setproctitle), gnutls (TLS page server).
#    Not needed for `make criu`: python3-protobuf (crit), libdrm-dev (amdgpu plugin).
# ---------------------------------------------------------------------------------------------
deps=(build-essential pkg-config protobuf-compiler protobuf-c-compiler libprotobuf-dev
  libprotobuf-c-dev libnl-3-dev libnet1-dev libcap-dev uuid-dev libnftables-dev libbsd-dev
  libgnutls28-dev xz-utils)
missing=()
for p in "${deps[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q '^install ok installed$' || missing+=("$p")
done
export DEBIAN_FRONTEND=noninteractive
if [ "${#missing[@]}" -gt 0 ]; then
  say "installing build dependencies: ${missing[*]}"
  apt-get update -qq || die "apt-get update failed; check the network and /etc/apt/sources*"
  if ! apt-get install -y -qq --no-install-recommends "${missing[@]}" >/tmp/build-criu-deps.log 2>&1; then
    tail -n 20 /tmp/build-criu-deps.log >&2
    die "could not install the build dependencies (${missing[*]}); full log in /tmp/build-criu-deps.log"
  fi
  rm -f /tmp/build-criu-deps.log
fi

# ---------------------------------------------------------------------------------------------
# 2. The CRIU source from sid, through a private apt configuration.
# ---------------------------------------------------------------------------------------------
mirror=${CRIU_DEBIAN_MIRROR:-}
if [ -z "$mirror" ]; then
  # deb822 files first (Debian 12 default), then the one-line format; skip the security archive.
  mirror=$(cat /etc/apt/sources.list.d/*.sources 2>/dev/null |
    awk 'tolower($1) == "uris:" { for (i = 2; i <= NF; i++) if ($i !~ /security/) { print $i; exit } }')
fi
if [ -z "$mirror" ]; then
  mirror=$(cat /etc/apt/sources.list /etc/apt/sources.list.d/*.list 2>/dev/null |
    awk '$1 == "deb" { for (i = 2; i <= NF; i++) if ($i ~ /^[a-z+]+:\/\//) { if ($i !~ /security/) { print $i; exit } else break } }')
fi
[ -n "$mirror" ] || die "no Debian mirror found in /etc/apt/sources.list*; set CRIU_DEBIAN_MIRROR=http://deb.debian.org/debian"
mirror=${mirror%/}

work=$(mktemp -d /tmp/build-criu.XXXXXX)
trap 'rm -rf "$work"' EXIT
mkdir -p "$work/apt/lists/partial" "$work/apt/cache/archives/partial" "$work/src"
keyring=/usr/share/keyrings/debian-archive-keyring.gpg
[ -r "$keyring" ] || die "$keyring is missing; install the debian-archive-keyring package"
echo "deb-src [signed-by=$keyring] $mirror sid main" >"$work/apt/sources.list"
# apt downloads as the unprivileged _apt user: let it write into the private dirs.
chmod 0755 "$work"
if id _apt >/dev/null 2>&1; then chown -R _apt "$work/apt" "$work/src"; fi
side=(-o "Dir::Etc::SourceList=$work/apt/sources.list" -o "Dir::Etc::SourceParts=-"
  -o "Dir::State::Lists=$work/apt/lists" -o "Dir::Cache=$work/apt/cache")

say "fetching the criu source package index for sid from $mirror"
apt-get "${side[@]}" update -qq ||
  die "apt-get update of the sid source index failed (mirror $mirror); check the network or set CRIU_DEBIAN_MIRROR"

cd "$work/src"
# Mirrors sometimes lack the Debian packaging tarball (404); only the upstream tarball matters,
# so the exit status is ignored and the tarball itself is checked for. apt verifies every file it
# does fetch against the signed index.
apt-get "${side[@]}" source --download-only criu >"$work/source.log" 2>&1 || true
orig=$(find . -maxdepth 1 -name 'criu_*.orig.tar.*' -print -quit)
if [ -z "$orig" ]; then
  cat "$work/source.log" >&2
  die "the criu upstream tarball did not download from $mirror (see apt's output above)"
fi
src_version=${orig#./criu_}
src_version=${src_version%.orig.tar.*}
dpkg --compare-versions "$src_version" ge "$min_version" ||
  die "sid offers criu $src_version, older than $min_version; nothing to build"

# ---------------------------------------------------------------------------------------------
# 3. Build and install.
# ---------------------------------------------------------------------------------------------
say "building criu $src_version (make -j$(nproc) criu)"
tar -xf "$orig"
srcdir=$(find . -maxdepth 1 -type d -name 'criu-*' -print -quit)
[ -n "$srcdir" ] || die "the tarball $orig has no criu-* directory"
if ! make -C "$srcdir" -j"$(nproc)" criu >"$work/make.log" 2>&1; then
  tail -n 30 "$work/make.log" >&2
  die "building criu $src_version failed (last lines of the build log above); a missing library usually means a missing -dev package"
fi
install -D -m 0755 "$srcdir/criu/criu" "$dest"

if ! "$dest" check >"$work/check.log" 2>&1; then
  cat "$work/check.log" >&2
  die "installed criu $(criu_version "$dest") at $dest but 'criu check' fails on this kernel (output above)"
fi
say "criu $(criu_version "$dest") installed at $dest; 'criu check' passes"
