#!/usr/bin/env bash
# Installs everything scripts/test.sh needs on a fresh Debian 12 machine (run as root).
# `setup.sh --runtime` installs only what `arca up` needs (Debian packages, the musl target);
# scripts/up.sh calls it that way.
#
# Idempotent: every step checks whether its result is already there, so a second run only
# does a few version checks. Network access needed on the first run: Debian apt, crates.io,
# PyPI and the npm registry.
set -euo pipefail

repo="$(cd "$(dirname "$0")/.." && pwd)"
cd "$repo"

log() { printf '[setup] %s\n' "$*"; }

# ---------------------------------------------------------------------------------------------
# Debian packages
#   util-linux: unshare (tests/compat/run-envd.sh)      file: static-linking check
#   curl: /health polling                               procps: pgrep/ps used by the tests
#   ncurses-bin: tput for PTY tests                     attr: getfattr/setfattr when debugging
#   musl-tools: musl-gcc for C code in the musl build   ca-certificates: registry TLS
#   build-essential: cc for cargo install / build scripts
#   debootstrap: builds the built-in Debian `base` template (arca-image)
#   iproute2, nftables: ip and nft, how arca-net makes sandbox network slots and the host firewall
#   busybox-static: the tiny root file system the runtime tests start sandboxes from
#   e2fsprogs: mkfs.ext4 for sandbox disks          bubblewrap: a baseline of `arca bench`
#   docker-registry, apache2-utils: a local registry (and htpasswd) for the template tests
#   openssl: the self-signed certificate of the network-policy tests' fake remote host
#   postgresql: throw-away servers (scripts/pg.sh) for the api's PostgreSQL tests
# ---------------------------------------------------------------------------------------------
apt_pkgs=(util-linux file curl procps ncurses-bin attr musl-tools ca-certificates build-essential
  iproute2 nftables debootstrap busybox-static e2fsprogs bubblewrap docker-registry apache2-utils
  openssl postgresql)
missing=()
for p in "${apt_pkgs[@]}"; do
  if ! dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q '^install ok installed$'; then
    missing+=("$p")
  fi
done
if ((${#missing[@]})); then
  log "apt-get install ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  # Only refresh the package lists when they are absent or older than a day.
  if [[ -z "$(find /var/lib/apt/lists -maxdepth 1 -name '*_Packages' -mtime -1 -print -quit 2>/dev/null)" ]]; then
    apt-get update -qq
  fi
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  # On a host with systemd the package starts a registry on :5000; the tests run their own.
  if [[ " ${missing[*]} " == *" docker-registry "* ]] && command -v systemctl >/dev/null &&
    systemctl is-active --quiet docker-registry 2>/dev/null; then
    systemctl disable --now docker-registry >/dev/null 2>&1 || true
  fi
  # Likewise the package's own cluster on :5432; the tests start theirs (scripts/pg.sh).
  if [[ " ${missing[*]} " == *" postgresql "* ]] && command -v systemctl >/dev/null &&
    systemctl is-active --quiet postgresql 2>/dev/null; then
    systemctl disable --now postgresql >/dev/null 2>&1 || true
  fi
fi

# ---------------------------------------------------------------------------------------------
# Rust: musl target, rustfmt/clippy, cargo-nextest
# ---------------------------------------------------------------------------------------------
command -v cargo >/dev/null || { echo "cargo not found: install Rust with rustup first" >&2; exit 1; }
if ! rustup target list --installed | grep -qx x86_64-unknown-linux-musl; then
  log "rustup target add x86_64-unknown-linux-musl"
  rustup target add x86_64-unknown-linux-musl
fi
for comp in rustfmt clippy; do
  if ! rustup component list --installed | grep -q "^${comp}"; then
    log "rustup component add ${comp}"
    rustup component add "${comp}"
  fi
done
# gVisor's runsc for the `gvisor` runtime (Debian 12's own is too old; see the script).
"$repo/scripts/install-runsc.sh"
if [[ "${1:-}" == --runtime ]]; then
  exit 0
fi
if ! cargo nextest --version >/dev/null 2>&1; then
  log "cargo install cargo-nextest"
  cargo install cargo-nextest --locked
fi

# ---------------------------------------------------------------------------------------------
# CRIU >= 4.2 (Debian 12's is too old for current kernels): built from Debian's source package so
# the checkpoint tests run. Optional for Arca itself: without it, sandboxes moved to disk keep
# their files only, and those tests say why they skipped.
# ---------------------------------------------------------------------------------------------
if ! scripts/build-criu.sh; then
  log "CRIU could not be built (see above): the checkpoint tests will be skipped"
fi

# ---------------------------------------------------------------------------------------------
# The `vm` runtime's guest kernel and modules (Debian's cloud kernel, not installed into /boot)
# and QEMU, for its tests; scripts/test.sh points the suites at them (ARCA_VM_ASSETS).
# ---------------------------------------------------------------------------------------------
scripts/vm-assets.sh "${ARCA_VM_ASSETS:-/var/cache/arca-test/vm}"

# ---------------------------------------------------------------------------------------------
# Python venvs with the official SDK, one per version, from fully pinned requirement files.
# ---------------------------------------------------------------------------------------------
py="${ARCA_PYTHON:-python3}"
"$py" -c 'import sys; assert sys.version_info >= (3, 11), sys.version' \
  || { echo "need python >= 3.11 (e2b 2.63 requires it)" >&2; exit 1; }
for ver in 2.63.0 2.45.1; do
  req="tests/compat/python/requirements-e2b-${ver}.txt"
  venv=".cache/venv/e2b-${ver}"
  want="$(sha256sum "$req" | cut -d' ' -f1) $("$py" -c 'import sys; print(sys.version.split()[0])')"
  if [[ -f "$venv/.arca-setup" && "$(cat "$venv/.arca-setup")" == "$want" ]]; then
    continue
  fi
  log "python venv $venv"
  rm -rf "$venv"
  "$py" -m venv "$venv"
  "$venv/bin/python" -m pip install -q --disable-pip-version-check --no-input -r "$req"
  "$venv/bin/python" -c "import importlib.metadata as m; assert m.version('e2b') == '${ver}'"
  printf '%s' "$want" >"$venv/.arca-setup"
done

# ---------------------------------------------------------------------------------------------
# JS SDK (versions pinned by tests/compat/js/package-lock.json)
# ---------------------------------------------------------------------------------------------
command -v node >/dev/null || { echo "node (>= 20) not found" >&2; exit 1; }
js=tests/compat/js
want="$(sha256sum "$js/package-lock.json" | cut -d' ' -f1) $(node --version)"
if [[ ! -f "$js/node_modules/.arca-setup" || "$(cat "$js/node_modules/.arca-setup")" != "$want" ]]; then
  log "npm ci in $js"
  (cd "$js" && npm ci --no-audit --no-fund --loglevel=error)
  printf '%s' "$want" >"$js/node_modules/.arca-setup"
fi

log "ok"
