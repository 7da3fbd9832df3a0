#!/usr/bin/env bash
# Starts Arca with the embedded defaults: builds what is needed, then runs `arca up`.
set -euo pipefail
cd "$(dirname "$0")/.."
[[ $(id -u) == 0 ]] || { echo "up.sh: run as root (arca up makes namespaces, cgroups and nftables rules)" >&2; exit 2; }
scripts/setup.sh --runtime
cargo build --release --locked -p arca-cli
cargo build --release --locked -p arca-envd --target x86_64-unknown-linux-musl
exec target/release/arca up --envd target/x86_64-unknown-linux-musl/release/arca-envd "$@"
