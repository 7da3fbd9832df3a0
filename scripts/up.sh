#!/usr/bin/env bash
# Starts Arca with the embedded defaults: builds what is needed, then runs `arca up`.
set -euo pipefail
cd "$(dirname "$0")/.."
command -v cargo >/dev/null || { echo "up.sh: cargo is missing; install Rust with rustup first" >&2; exit 2; }
rustup target list --installed 2>/dev/null | grep -qx x86_64-unknown-linux-musl \
  || rustup target add x86_64-unknown-linux-musl
cargo build --release --locked -p arca-cli
cargo build --release --locked -p arca-envd --target x86_64-unknown-linux-musl
exec target/release/arca up --envd target/x86_64-unknown-linux-musl/release/arca-envd "$@"
